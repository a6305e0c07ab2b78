"""Image arrays in the layouts models take (CHW, HWC, HW) as 2-D pictures for people."""

from __future__ import annotations

import numpy as np

from service.client.wire import Array

CHANNELS = (1, 3, 4)


def channels_first(shape: tuple[int, ...]) -> bool:
    """True for (C, H, W) with C in 1, 3, 4 and a last axis that is not a channel count."""
    return len(shape) == 3 and shape[0] in CHANNELS and shape[-1] not in CHANNELS


def heat(a: Array) -> Array:
    """An attribution map of one image, (C, H, W), (H, W, C) or (H, W), as (H, W): the sum
    over channels (each element carries its group's attribution)."""
    if a.ndim == 2:
        return a
    if a.ndim != 3:
        raise ValueError(f"an image map has 2 or 3 axes; got shape {list(a.shape)}")
    return a.sum(axis=0 if channels_first(a.shape) else -1)  # type: ignore[no-any-return]


def picture(x: Array) -> Array:
    """An input image as (H, W) grey or (H, W, 3) colour in [0, 1] for display."""
    if x.ndim == 3:
        x = np.moveaxis(x, 0, -1) if channels_first(x.shape) else x  # (H, W, C)
        x = x[..., 0] if x.shape[-1] == 1 else x[..., :3]
    x = x.astype(np.float64)
    low, high = float(np.min(x)), float(np.max(x))
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


def coarse(a: Array, cells: int) -> Array:
    """(H, W) averaged over blocks so that neither axis has more than `cells` entries."""
    step = max(1, -(-max(a.shape) // cells))
    h, w = -(-a.shape[0] // step), -(-a.shape[1] // step)
    padded = np.full((h * step, w * step), np.nan)
    padded[:a.shape[0], :a.shape[1]] = a
    return np.nanmean(padded.reshape(h, step, w, step), axis=(1, 3))  # type: ignore[no-any-return]
