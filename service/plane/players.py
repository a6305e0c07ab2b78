"""The players of a request and what replaces a removed one, decided once per request: tabular
columns (or configured blocks), an image's grid of patches, a text's tokens, a client's mask, or
occlusion windows; the stored background rows or a named baseline. Rows then ask for their
groups (text: per row) and their reference rows (blur, mask: per row)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from explainers.base import Array
from explainers.errors import InvalidArgument
from explainers.groups import Groups, Hierarchy
from explainers.perturbation.occlusion import Windows
from service.models.inputs import Layout, Modality
from service.models.repository import LoadedModel
from service.plane.baselines import BaselineSpec, check_baseline
from service.plane.grouping import (
    GroupRequest,
    cells_for,
    column_groups,
    image_groups,
    mask_groups,
    token_groups,
)

Fits = Callable[[int], bool]  # whether the method can afford d players in its time


@dataclass(frozen=True)
class OcclusionRequest:
    """A request's occlusion window (empty = the model's default)."""

    window: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    input: str = ""


@dataclass(frozen=True)
class Players:
    """How one request's rows become games: the groups (fixed, or per row for text), the
    baseline, and the words the response uses for both."""

    modality: Modality
    layout: Layout
    grouping: str
    baseline: BaselineSpec
    fixed: Groups | None  # the same groups for every row; None = per row (tokens)
    pad: int | None = None
    vocabulary: tuple[str, ...] = ()

    def groups_for(self, x: Array) -> Groups:
        """The groups of row x (elements,)."""
        if self.fixed is not None:
            return self.fixed
        return token_groups(self.layout, self.modality, x, self.pad, self.vocabulary)[0]

    @property
    def plain(self) -> bool:
        """One player per column of a table against the stored background rows: today's
        per-feature attributions, no maps. Never for an image or a text whose every element is
        its own group (they keep their maps and hierarchy), a hierarchy, or a named baseline
        (zeros, mean, ...: its reference row replaces the background rows)."""
        return self.modality.kind == "tabular" and self.fixed is not None and \
            self.fixed.identity and self.fixed.hierarchy is None and \
            self.baseline.kind == "background"

    @property
    def labels(self) -> tuple[str, ...]:
        """Player labels shared by every row (empty when they vary per row)."""
        return () if self.fixed is None else self.fixed.labels


def resolve_players(model: LoadedModel, layout: Layout, groups: GroupRequest,
                    baseline: BaselineSpec | None, fits: Fits) -> Players:
    """The request's players and baseline, from the request, else explain.yaml, else the
    modality's defaults (tabular: one per column; image: the largest grid `fits` allows;
    text: one per non-pad token)."""
    modality = model.modality
    spec = baseline or default_baseline(model)
    if spec.mask_token is None and model.config.text is not None:
        spec = replace(spec, mask_token=model.config.text.mask_token)
    spec = check_baseline(spec, modality)
    if groups.mask is not None:
        fixed, what = mask_groups(layout, groups)
        return Players(modality, layout, what, spec, fixed)
    if modality.kind == "image":
        fixed, what = _image(model, layout, groups, fits)
        return Players(modality, layout, what, spec, fixed)
    if groups.patch or groups.grid:
        raise InvalidArgument("groups.patch: patches and grids are for image models; this "
                              f"model's inputs are read as {modality.kind}")
    if modality.kind == "text":
        text = model.config.text
        pad = text.pad_token if text is not None else 0
        name = layout.specs[modality.input].name
        return Players(modality, layout, f"one group per non-pad token of input {name!r}",
                       spec, None, pad, model.vocabulary)
    fixed = _tabular(model)
    what = "one group per feature" if fixed.identity else f"{fixed.size} feature groups"
    return Players(modality, layout, what, spec, _with_hierarchy(fixed, groups))


def default_baseline(model: LoadedModel) -> BaselineSpec:
    """explain.yaml's baseline, else: background rows (tabular), zeros (images), the mask
    token (text; the pad token, i.e. the word deleted, without a mask token)."""
    text = model.config.text
    mask = text.mask_token if text is not None else None
    kind = model.config.baseline or {"image": "zeros", "text": "mask" if mask is not None
                                     else "constant"}.get(model.modality.kind, "background")
    value = model.config.baseline_value
    if kind == "constant" and model.config.baseline is None:  # text without a mask token
        value = float(text.pad_token or 0) if text is not None else 0.0
    return BaselineSpec(kind, value, mask_token=mask)


def _image(model: LoadedModel, layout: Layout, groups: GroupRequest,
           fits: Fits) -> tuple[Groups, str]:
    config = model.config.image
    patch = groups.patch or _as_tuple(config.patch if config else None)
    grid = groups.grid or _as_tuple(config.grid if config else None)
    cells = cells_for(layout, model.modality, patch if not groups.grid else (), grid, fits)
    fixed, what = image_groups(layout, model.modality, cells)
    return _with_hierarchy(fixed, groups), what


def _tabular(model: LoadedModel) -> Groups:
    blocks = [(g.name, g.features) for g in model.config.groups or ()]
    return column_groups(model.feature_names, blocks)


def _with_hierarchy(groups: Groups, request: GroupRequest) -> Groups:
    if not request.hierarchy:
        return groups
    return groups.with_hierarchy(Hierarchy.build(groups.size, request.hierarchy))


def _as_tuple(value: list[int] | int | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def occlusion_windows(model: LoadedModel, layout: Layout, request: OcclusionRequest) -> Windows:
    """The sliding windows of method occlusion over one input: the request's, explain.yaml's,
    or a quarter of each spatial axis (whole channels), stride half the window."""
    k = layout.input_of(request.input) if request.input else model.modality.input
    shape = layout.shapes[k]
    config = model.config.occlusion
    window = request.window or _as_tuple(config.window if config else None)
    strides = request.strides or _as_tuple(config.strides if config else None)
    image = model.modality.kind == "image" and k == model.modality.input
    spatial = model.modality.spatial_axes(len(shape)) if image else tuple(range(len(shape)))
    size = _per_axis(window, shape, spatial, (lambda n: max(1, n // 4)) if image else None)
    step = _per_axis(strides, shape, spatial, None, size) if strides else \
        tuple(max(1, s // 2) for s in size)
    return Windows.build(shape, size, step, layout.offsets[k], layout.elements)


def _per_axis(values: tuple[int, ...], shape: tuple[int, ...], spatial: tuple[int, ...],
              default: Callable[[int], int] | None,
              window: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """One value per axis: as given (full rank), or one value for every spatial axis with the
    other axes whole (windows) or 1 (strides)."""
    if len(values) == len(shape):
        return values
    if len(values) > 1:
        raise InvalidArgument(f"occlusion.window: one value, or one per axis of {list(shape)}")
    out = []
    for a, n in enumerate(shape):
        if a in spatial:
            out.append(values[0] if values else default(n) if default else 1)
        else:
            out.append(n if window is None else 1)
    return tuple(out)


def least_rows(method: str, d: int) -> float:
    """Model rows (per reference row) a method needs at least to explain d players soundly,
    with room for a few sampling rounds: what the default image grid is sized by."""
    key = method.strip().lower() or "auto"
    if key == "exact":
        return float(2**d) if d <= 16 else float("inf")
    if key == "partition":
        return float(min(8 * d * d, 2**d))  # distinct Owen coalitions, measured on quadtrees
    if key == "kernel":
        return 12.0 * d
    if key == "lime":
        return 4.0 * (d + 2)
    return 64.0 * max(d - 1, 1)  # permutation and auto: 8 pairs of 2 (d - 1) rows, 4 rounds
