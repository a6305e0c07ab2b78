"""`occlusion`: slide a window over the input, replace what it covers by the reference, and read
the output's drop (Zeiler & Fergus 2014; Captum's `Occlusion`).

Each window's value is f(x) - E_b f(x with the window from background row b). The map gives
every element the mean drop of the windows that cover it, as Captum does (its window count per
axis is ceil((size - window) / stride) + 1, the last window clipped at the edge, so every
element is covered). All windows go through the model in batched calls; the answer is exact
(no sampling), so its standard errors are 0; it is not additive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.errors import InvalidArgument, ResourceExhausted
from explainers.groups import Groups
from explainers.masking import coalition_values, pinned

MAX_WINDOWS = 65_536


@dataclass(frozen=True)
class Windows:
    """Sliding windows over one input of element shape `shape`, placed at `offset` in the
    flat row of `elements` elements. Masks are built per block, never all at once."""

    shape: tuple[int, ...]
    window: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0
    elements: int = 0

    @staticmethod
    def build(shape: Sequence[int], window: Sequence[int], strides: Sequence[int] | None = None,
              offset: int = 0, elements: int | None = None) -> Windows:
        """Check the window fits the input and the strides do not skip elements."""
        shape, window = tuple(int(s) for s in shape), tuple(int(w) for w in window)
        strides = tuple(int(s) for s in strides) if strides is not None else (1,) * len(shape)
        if not len(window) == len(strides) == len(shape):
            raise InvalidArgument(f"occlusion.window: one size and stride per input axis "
                                  f"{list(shape)}; got {list(window)} and {list(strides)}")
        if any(not 1 <= w <= s for w, s in zip(window, shape, strict=True)) or \
                any(not 1 <= t <= w for t, w in zip(strides, window, strict=True)):
            raise InvalidArgument(f"occlusion.window: sizes must be in 1..{list(shape)} and "
                                  f"strides in 1..window; got {list(window)}, {list(strides)}")
        total = offset + math.prod(shape) if elements is None else elements
        return Windows(shape, window, strides, offset, total)

    @property
    def counts(self) -> tuple[int, ...]:
        """Window positions per axis."""
        return tuple(-(-(s - w) // t) + 1
                     for s, w, t in zip(self.shape, self.window, self.strides, strict=True))

    @property
    def count(self) -> int:
        return math.prod(self.counts)

    def labels(self) -> tuple[str, ...]:
        """'window i,j' by the window's start on each axis."""
        return tuple("window " + ",".join(str(s) for s in self._start(k))
                     for k in range(self.count))

    def masks(self, start: int, stop: int) -> Array:
        """Element masks of windows start..stop-1: (windows, elements) bool, True = covered."""
        out = np.zeros((stop - start, self.elements), bool)
        for row, k in enumerate(range(start, stop)):
            block = np.zeros(self.shape, bool)
            block[tuple(slice(s, s + w) for s, w in zip(self._start(k), self.window,
                                                        strict=True))] = True
            out[row, self.offset:self.offset + block.size] = block.ravel()
        return out

    def _start(self, k: int) -> tuple[int, ...]:
        index = np.unravel_index(k, self.counts)
        return tuple(int(i) * t for i, t in zip(index, self.strides, strict=True))


class Occlusion:
    """Output drop per window, and the overlap-averaged map; one instance per window layout."""

    name = "occlusion"

    def __init__(self, windows: Windows) -> None:
        if windows.count > MAX_WINDOWS:
            raise InvalidArgument(f"occlusion.window: {windows.count} windows; at most "
                                  f"{MAX_WINDOWS}: use a larger window or stride")
        self.windows = windows

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        """One evaluation per window and background row, plus f(x)."""
        return self.windows.count * background.rows + 1

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Check the layout matches x and that every window fits the budget, then compute."""
        if self.windows.elements != x.size:
            raise InvalidArgument(f"occlusion.window: laid out over {self.windows.elements} "
                                  f"elements, the row has {x.size}")
        needed = self.expected_evaluations(x.size, background) or 0
        if model.affordable_rows(budget) < needed:
            raise ResourceExhausted(f"budget_ms: occlusion needs {needed} model evaluations "
                                    f"(~{1e3 * model.seconds_for(needed):.0f} ms here): raise "
                                    "budget_ms or use a larger window or stride")
        return self._explain(model, x, pinned(model, x, background, groups))

    def _explain(self, model: Evaluator, x: Array, background: Background) -> Explanation:
        fx = model(x[None])[0]  # (outputs,)
        total = np.zeros((fx.size, x.size))  # (outputs, elements) sum of covering drops
        cover = np.zeros(x.size)  # (elements,) windows covering each element
        drops = []
        block = max(1, model.chunk_rows // background.rows)
        for start in range(0, self.windows.count, block):
            m = self.windows.masks(start, min(start + block, self.windows.count))
            drop = fx - coalition_values(model, ~m, x, background)  # (windows, outputs)
            total += drop.T @ m
            cover += m.sum(axis=0)
            drops.append(drop)
        values = np.concatenate(drops).T  # (outputs, windows)
        heat = np.divide(total, cover, out=np.zeros_like(total), where=cover > 0)
        return Explanation.build(self.name, values, np.zeros_like(values),
                                 background.base_values, fx, evaluations=model.evaluations,
                                 converged=True, budget_exhausted=False, map=heat,
                                 additive=False,
                                 diagnostics=(("windows", float(self.windows.count)),))
