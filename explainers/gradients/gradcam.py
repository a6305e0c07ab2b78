"""`gradcam` and `gradcam++`: class activation maps from a convolutional layer's activation A
(channels, *space) and the target's gradient G with respect to it (Selvaraju et al. 2017;
Chattopadhay et al. 2018).

Grad-CAM weighs each channel by the mean of its gradient over space, alpha_c = mean(G_c), and
the map is sum_c alpha_c A_c. Grad-CAM++ weighs by sum over space of relu(G) times
G^2 / (2 G^2 + sum(A_c) G^3) (0 where G = 0), the closed form of its paper for an exponential
output, as pytorch-grad-cam computes it. ReLU on the map is optional and off by default,
Captum's LayerGradCam convention (relu_attributions=False): negative evidence stays visible.
The layer-resolution map is upsampled to the input's spatial shape by nearest neighbour
(Captum's LayerAttribution.interpolate default) and given to every channel of each input
position; group values are sums of that map. One pass at x; not additive.

The layer is the GradientModel's (built with `layer=`); by default the last convolution with
a spatial output, after its ReLU (explainers.gradients.graphs.last_spatial_conv).
"""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Explanation
from explainers.errors import InvalidArgument
from explainers.gradients.backend import GradientModel
from explainers.gradients.common import AtX, Calls, explanation
from explainers.groups import Groups


def channel_weights(A: Array, G: Array, plus_plus: bool) -> Array:
    """(outputs, channels) weights from A (channels, *space) and G (outputs, channels,
    *space)."""
    space = tuple(range(2, G.ndim))
    if not plus_plus:
        return np.asarray(G.mean(axis=space))
    g2 = G**2
    total = A.sum(axis=tuple(range(1, A.ndim)))  # (channels,)
    shape = (1, -1) + (1,) * (G.ndim - 2)
    denominator = 2 * g2 + total.reshape(shape) * G**3
    alpha = np.divide(g2, denominator, out=np.zeros_like(g2), where=(G != 0) &
                      (denominator != 0))
    return np.asarray((alpha * np.maximum(G, 0)).sum(axis=space))


def upsample(cam: Array, shape: tuple[int, ...]) -> Array:
    """Nearest-neighbour resize of (outputs, *space) maps to (outputs, *shape): source index
    floor(i * in / out) per axis, as torch's 'nearest' mode."""
    for axis, size in enumerate(shape, start=1):
        index = (np.arange(size) * cam.shape[axis]) // size
        cam = np.take(cam, index, axis=axis)
    return cam


class GradCam(AtX):
    """Grad-CAM (or Grad-CAM++) at a GradientModel's layer for the image input; one instance
    per layer model. One gradient row at x, like saliency (AtX); the background is not used."""

    def __init__(self, gm: GradientModel, relu: bool = False, plus_plus: bool = False) -> None:
        if not gm.is_layer:
            raise InvalidArgument("gradcam: needs a GradientModel built with a layer")
        super().__init__(gm)
        self.relu, self.plus_plus = relu, plus_plus
        self.name = "gradcam++" if plus_plus else "gradcam"
        self.layer = gm.variables[0]
        self.image = _image_input(gm, len(self.layer.shape) - 1)

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return 2  # the layer's forward pass, then the gradient

    def _explain(self, calls: Calls, groups: Groups | None) -> Explanation:
        fx, g = calls.grads(calls.P)  # (1, outputs), (1, outputs, p)
        A = calls.P.reshape(self.layer.shape)  # (channels, *space)
        G = g[0].reshape(self.gm.columns, *self.layer.shape)  # (outputs, channels, *space)
        weights = channel_weights(A, G, self.plus_plus)  # (outputs, channels)
        cam = np.einsum("kc,c...->k...", weights, A)  # (outputs, *space)
        cam = np.maximum(cam, 0) if self.relu else cam
        heat = self._to_input(cam)  # (outputs, elements)
        return explanation(self.name, self.gm, heat, groups, np.zeros_like(fx[0]), fx[0], calls,
                           diagnostics=(("relu", float(self.relu)),
                                        ("channels", float(A.shape[0]))))

    def _to_input(self, cam: Array) -> Array:
        """(outputs, *space) -> (outputs, elements): upsampled to the image's trailing
        spatial axes, repeated over its leading (channel) axes; other inputs get 0."""
        _, shape, where = self.image
        spatial = shape[len(shape) - (cam.ndim - 1):]
        big = upsample(cam, spatial)  # (outputs, *spatial)
        full = np.broadcast_to(big.reshape(cam.shape[0], *(1,) * (len(shape) - len(spatial)),
                                           *spatial), (cam.shape[0], *shape))
        out = np.zeros((cam.shape[0], self.gm.elements))
        out[:, where] = full.reshape(cam.shape[0], -1)
        return out


def _image_input(gm: GradientModel, spatial: int) -> tuple[str, tuple[int, ...], slice]:
    """The first float input with at least `spatial` spatial axes after a channel axis."""
    for name, i in gm.inputs.items():
        if i.kind == "f" and len(i.shape) >= spatial + 1:
            return name, i.shape, i.elements
    raise InvalidArgument(f"gradcam: no floating-point input with {spatial} spatial axes to "
                          "map the layer onto")
