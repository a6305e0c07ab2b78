"""The gradient methods of a request: a GradientModel per (model file, output, columns, scale,
layer, input shapes) built on first use and cached (explainers/gradients/backend.py), and the
method's estimator over it. Gradients are taken on the logit (the input of a final Softmax or
Sigmoid, found in the graph) unless the request asks for the identity scale."""

from __future__ import annotations

from dataclasses import dataclass, replace

from explainers.base import Estimator
from explainers.errors import FailedPrecondition, InvalidArgument
from explainers.gradients.backend import GradientCache, GradientModel
from explainers.gradients.deeplift import DeepLift
from explainers.gradients.gradcam import GradCam
from explainers.gradients.graphs import last_spatial_conv
from explainers.gradients.input_x_gradient import InputXGradient
from explainers.gradients.integrated_gradients import IntegratedGradients
from explainers.gradients.saliency import Saliency
from explainers.gradients.smoothgrad import NOISE_LEVEL, SmoothGrad
from service.models.inputs import Layout
from service.models.repository import LoadedModel
from service.plane.requests import GradientRequest
from service.plane.targets import Target

METHODS = ("saliency", "input_x_gradient", "smoothgrad", "integrated_gradients", "deeplift",
           "deepshap", "gradcam", "gradcam++")
MAX_NOISE_LEVEL = 100.0  # smoothgrad's noise, in input ranges: past it the answer is noise
SCALES = {"": "auto", "identity": "identity", "logit": "logit", "margin": "logit"}


@dataclass(frozen=True)
class GradientChoice:
    """The estimator, the target it differentiates (its scale) and what to tell the caller."""

    estimator: Estimator
    target: Target
    notes: tuple[str, ...]


class GradientMethods:
    """Builds (once) and caches the GradientModels the gradient methods run on."""

    def __init__(self, cache_bytes: int) -> None:
        self.cache = GradientCache(cache_bytes)

    def choose(self, name: str, model: LoadedModel, target: Target, scale: str,
               layout: Layout, options: GradientRequest) -> GradientChoice:
        """The estimator of gradient method `name` on this model and target; `scale` is the
        request's own (""= the logit where the graph has one)."""
        layer = self._layer(name, model, options)
        gm = self.cache.get(model.sha256, model.onnx.proto, layout.feeds, layout.elements,
                            target.output, target.columns, SCALES.get(scale, "auto"), layer,
                            rescale=name in ("deeplift", "deepshap"))
        moved = replace(target, scale=gm.target.scale)
        return GradientChoice(estimator_of(name, gm, options), moved,
                              (*gm.notes, f"gradient engine: {gm.engine}"))

    @staticmethod
    def _layer(name: str, model: LoadedModel, options: GradientRequest) -> str | None:
        """Grad-CAM's layer: the request's, else the last spatial convolution."""
        if not name.startswith("gradcam"):
            if options.layer:
                raise InvalidArgument(f"gradients.layer: only gradcam takes a layer, not {name}")
            return None
        layer = options.layer or last_spatial_conv(model.onnx.proto)
        if layer is None:
            raise FailedPrecondition("gradients.layer: the model has no convolution with a "
                                     "spatial output; name a layer (see ListLayers)")
        return layer


def estimator_of(name: str, gm: GradientModel, o: GradientRequest) -> Estimator:
    """One estimator instance per request (they hold the GradientModel and the options)."""
    if o.samples < 0 or o.steps < 0:
        raise InvalidArgument("gradients: samples and steps must be >= 0")
    if not 0 <= o.noise_level <= MAX_NOISE_LEVEL:  # NaN too
        raise InvalidArgument(f"gradients.noise_level: {o.noise_level}; a share of the input's "
                              f"range from 0 to {MAX_NOISE_LEVEL:g} (0 = {NOISE_LEVEL})")
    if name == "saliency":
        return Saliency(gm, absolute=not o.signed)
    if name == "input_x_gradient":
        return InputXGradient(gm)
    if name == "integrated_gradients":
        return IntegratedGradients(gm, o.steps or None)
    if name == "smoothgrad":
        return SmoothGrad(gm, o.noise_level or NOISE_LEVEL, o.samples or None,
                          absolute=not o.signed)
    if name in ("deeplift", "deepshap"):
        return DeepLift(gm, average=name == "deepshap")
    return GradCam(gm, relu=o.relu, plus_plus=name == "gradcam++")
