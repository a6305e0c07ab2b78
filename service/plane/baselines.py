"""What replaces a removed group: the stored background rows (tables), or a named baseline for
images and text, built as reference rows for the explained row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from explainers.base import Array
from explainers.errors import InvalidArgument
from service.models.inputs import Layout, Modality

KINDS = ("background", "zeros", "mean", "blur", "constant", "mask")
PER_ROW = ("blur", "mask")  # baselines that depend on the explained row
DEFAULT_SIGMA = 2.0


@dataclass(frozen=True)
class BaselineSpec:
    """A baseline by name: its constant (constant), blur width in pixels, the mask token."""

    kind: str
    value: float = 0.0
    sigma: float = DEFAULT_SIGMA
    mask_token: int | None = None

    @property
    def per_row(self) -> bool:
        return self.kind in PER_ROW

    def describe(self, background_name: str) -> str:
        """What the response says replaced a removed group."""
        return {"background": "background rows",
                "zeros": "zeros",
                "mean": f"mean of background {background_name!r}",
                "blur": f"blur (sigma {self.sigma:g} px)",
                "constant": f"constant {self.value:g}",
                "mask": f"mask token {self.mask_token}"}[self.kind]


def baselines_for(modality: Modality) -> tuple[str, ...]:
    """The baseline kinds a request may ask for on this modality."""
    return tuple(k for k in KINDS if (k != "blur" or modality.kind == "image")
                 and (k != "mask" or modality.kind == "text"))


def check_baseline(spec: BaselineSpec, modality: Modality) -> BaselineSpec:
    """The kind must exist and suit the modality (blur: images; mask: text with a token)."""
    if spec.kind not in KINDS:
        raise InvalidArgument(f"baseline.kind: {spec.kind!r}; use one of {', '.join(KINDS)}")
    if spec.kind == "blur" and modality.kind != "image":
        raise InvalidArgument("baseline.kind: blur needs an image input")
    if spec.kind == "mask" and (modality.kind != "text" or spec.mask_token is None):
        raise InvalidArgument("baseline.kind: mask needs a text model with a mask token "
                              "(explain.yaml text.mask_token)")
    if spec.kind == "blur" and not 0 < spec.sigma <= 1e3:
        raise InvalidArgument("baseline.sigma: must be in (0, 1000] pixels")
    if not np.isfinite(spec.value):
        raise InvalidArgument("baseline.value: must be finite")
    return spec


def baseline_rows(spec: BaselineSpec, x: Array, layout: Layout, modality: Modality,
                  background: Array | None, weights: Array | None = None) -> Array:
    """Reference rows (rows, elements) for the explained row x (elements,). Images and text:
    only the modality's input is replaced, other inputs keep x's values (their elements are in
    no group unless the request says otherwise). Tables: every column is a player, so the whole
    row is replaced, whatever input a column comes from."""
    if spec.kind == "background":
        if background is None:
            raise InvalidArgument("baseline.kind: background needs a stored background")
        return background
    k = modality.input
    a, b = (layout.offsets[k], layout.offsets[k + 1]) if modality.kind != "tabular" \
        else (0, layout.elements)
    row = x.astype(np.float64).copy()
    row[a:b] = _replacement(spec, x[a:b], layout.shapes[k], modality, background, weights, a, b)
    return row[None]


def _replacement(spec: BaselineSpec, part: Array, shape: tuple[int, ...], modality: Modality,
                 background: Array | None, weights: Array | None, a: int, b: int) -> Array:
    if spec.kind == "zeros":
        return np.zeros_like(part, np.float64)
    if spec.kind == "constant":
        return np.full(part.shape, spec.value)
    if spec.kind == "mask":
        return np.full(part.shape, float(spec.mask_token))  # type: ignore[arg-type]
    if spec.kind == "mean":
        if background is None:
            raise InvalidArgument("baseline.kind: mean needs a stored background")
        w = np.full(background.shape[0], 1 / background.shape[0]) if weights is None else weights
        return np.asarray(w @ background[:, a:b])
    return blur(part.reshape(shape), modality.spatial_axes(len(shape)), spec.sigma).ravel()


def blur(image: Array, axes: tuple[int, ...], sigma: float) -> Array:
    """A Gaussian blur over the spatial axes only (channels stay apart), edges reflected."""
    sigmas = [sigma if a in axes else 0.0 for a in range(image.ndim)]
    return np.asarray(ndimage.gaussian_filter(image.astype(np.float64), sigmas, mode="reflect"))
