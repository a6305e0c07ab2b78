"""Which estimator explains a request: the generic registry, plus each model's exact methods read
off its graph (TreeSHAP for tree ensembles, closed form for affine models). A requested method
that cannot serve the request falls back to a sampler, and the notes say why: never a wrong
answer, never a silent switch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from explainers.base import Array, Background, Estimator, Evaluator, Explanation, ModelFn
from explainers.errors import InvalidArgument, ResourceExhausted, quoted
from explainers.memory import ByteLru
from explainers.shapley.linear import AffineFit, LinearShap, fit_affine
from explainers.trees.onnx_trees import predict_margin
from explainers.trees.tree import FitCache, TreeShap, fit_cache
from service.plane.gradients import METHODS as GRADIENT_METHODS

if TYPE_CHECKING:
    from service.models.repository import LoadedModel
    from service.plane.targets import Target

log = logging.getLogger(__name__)
MODEL_METHODS = ("tree", "linear", "occlusion", *GRADIENT_METHODS)  # per model or request
AGREEMENT_TOL = 1e-4  # trees rebuilt from the graph vs onnxruntime, relative to the spread
CACHE_SIZE = 256
TREE_CACHE_BYTES = 128 * 1024**2  # SIDELIGHT_TREE_CACHE_BYTES's default at a 2 GiB limit


BatchFn = Callable[[Array, Background, Evaluator], list[Explanation]]


def batch_explainer(estimator: Estimator) -> BatchFn | None:
    """The estimator's `explain_rows` when it explains a whole batch exactly, without a per-row
    budget (tree, linear). An attribute check: a runtime Protocol check costs ~25 us a call."""
    found = getattr(estimator, "explain_rows", None)
    return found if callable(found) else None


@dataclass(frozen=True)
class Choice:
    """The estimator for a request, the target it explains (tree may move it to the margin)
    and what the caller should be told."""

    estimator: Estimator
    target: Target
    notes: tuple[str, ...] = ()


class MethodResolver:
    """Resolves method names per request; caches TreeShap objects and affine fits per model,
    and TreeSHAP's tables per background, within `cache_bytes` (3/4 of it for the tables)."""

    def __init__(self, registry: Mapping[str, Estimator],
                 cache_bytes: int = TREE_CACHE_BYTES) -> None:
        self.registry = registry
        self._fits: FitCache = fit_cache(cache_bytes - cache_bytes // 4)
        self._trees: ByteLru[tuple[object, ...], TreeShap | str] = ByteLru(
            cache_bytes // 8, CACHE_SIZE, lambda t: t.nbytes if isinstance(t, TreeShap) else 64)
        self._affine: ByteLru[tuple[object, ...], AffineFit | str] = ByteLru(
            cache_bytes // 8, CACHE_SIZE)
        self._prefitting = threading.Lock()  # held by the one fit running off the request path

    def known(self) -> tuple[str, ...]:
        """Every method name a request may use."""
        return tuple(sorted({*self.registry, *MODEL_METHODS}))

    def choose(self, name: str, model: LoadedModel, target: Target, background: Background,
               fn: Callable[[Target], ModelFn], background_key: str, rows: int,
               seconds: float) -> Choice:
        """The estimator for method `name` ("" = auto) on this model, target and background,
        for `rows` rows in `seconds`."""
        key = name.strip().lower() or "auto"
        if key == "tree":
            return self._in_time(self._tree(model, target, background, fn), rows, background,
                                 seconds, explicit=True)
        if key == "linear":
            return self._linear(model, target, background, fn, background_key, explicit=True)
        if key == "auto":
            auto = self._auto(model, target, background, fn, background_key)
            return self._in_time(auto, rows, background, seconds, explicit=False)
        if key not in self.registry:
            raise InvalidArgument(f"method: unknown method {quoted(name)}; known: "
                                  f"{', '.join(self.known())}")
        return Choice(self.registry[key], target)

    def _auto(self, model: LoadedModel, target: Target, background: Background,
              fn: Callable[[Target], ModelFn], background_key: str) -> Choice:
        """Tree when the trees compute the target itself, else linear when affine, else the
        generic auto (exact if it fits, else the sampler)."""
        tree = self._tree_for(model, target, background, fn(target))
        if isinstance(tree, TreeShap):
            return Choice(tree, target)
        if model.trees is None:
            linear = self._linear(model, target, background, fn, background_key, explicit=False)
            if isinstance(linear.estimator, LinearShap):
                return linear
        return Choice(self.registry["auto"], target)

    def _in_time(self, choice: Choice, rows: int, background: Background, seconds: float,
                 explicit: bool) -> Choice:
        """TreeSHAP's time grows with rows, plus the one-off fit of a background it has not
        fitted: refuse (explicit) or sample (auto) when the prediction misses the budget. A
        missing fit then runs off the request path, so that the next requests find it."""
        tree = choice.estimator
        if not isinstance(tree, TreeShap):
            return choice
        needed = tree.seconds_for(rows, background)
        if needed is None or needed <= seconds:
            return choice
        what = (f"tree needs about {1e3 * needed:.0f} ms for {rows} row(s) against "
                f"{background.rows} background rows")
        fit = tree.fit_seconds(background)
        if fit:
            what += (f" ({1e3 * fit:.0f} ms of it to tabulate this background, once: started "
                     "now for the next requests)")
            self._prefit_later(tree, background)
        if explicit:
            raise ResourceExhausted(f"budget_ms: {what}, more than the {1e3 * seconds:.0f} ms "
                                    "left: raise budget_ms, send fewer rows or use auto")
        return Choice(self.registry["auto"], choice.target, (f"{what}; sampled instead",))

    def prefit(self, model: LoadedModel, target: Target, background: Background,
               fn: Callable[[Target], ModelFn]) -> None:
        """Fit the trees' tables for a background ahead of traffic (start-up, uploads), on the
        target or, when the trees do not compute it, on their own scale. Never raises: a
        request would fit it, or say why not."""
        try:
            tree = self._tree_for(model, target, background, fn(target))
            raw = tree_scale(model, target) if not isinstance(tree, TreeShap) else None
            if raw is not None:
                tree = self._tree_for(model, raw, background, fn(raw))
            if isinstance(tree, TreeShap):
                tree.prefit(background)
        except Exception as err:
            log.warning("tree: fitting a background ahead of traffic failed: %s: %s",
                        type(err).__name__, err)

    def _prefit_later(self, tree: TreeShap, background: Background) -> None:
        """Fit in a thread, one at a time: while one runs, others are skipped (a later request
        that misses its budget for the same reason starts it again)."""
        if not self._prefitting.acquire(blocking=False):
            return

        def run() -> None:
            try:
                tree.prefit(background)
            except Exception as err:  # the request that needs it will say why
                log.warning("tree: fitting a background off the request path failed: %s: %s",
                            type(err).__name__, err)
            finally:
                self._prefitting.release()

        threading.Thread(target=run, daemon=True, name="sidelight-tree-fit").start()

    def _tree(self, model: LoadedModel, target: Target, background: Background,
              fn: Callable[[Target], ModelFn]) -> Choice:
        """TreeSHAP on the target, or on the trees' own scale (said in a note), or a sampler."""
        tree = self._tree_for(model, target, background, fn(target))
        if isinstance(tree, TreeShap):
            return Choice(tree, target)
        raw = tree_scale(model, target)
        if raw is not None:
            moved = self._tree_for(model, raw, background, fn(raw))
            if isinstance(moved, TreeShap):
                return Choice(moved, raw, (f"method tree: explained on the {raw.scale} scale, "
                                           f"the trees' raw scores; the {target.scale} scale "
                                           "needs a sampler (method permutation)",))
        why = tree if isinstance(tree, str) else model.tree_error
        return Choice(self.registry["auto"], target,
                      (f"method tree unavailable ({why}); fell back to auto",))

    def _tree_for(self, model: LoadedModel, target: Target, background: Background,
                  f: ModelFn) -> TreeShap | str:
        """A TreeShap whose margins reproduce f, or the reason there is none (cached)."""
        if model.trees is None:
            return model.tree_error
        if not tree_computes(model, target):
            return f"the trees do not compute the {target.scale} scale of {target.output!r}"
        key = (model.sha256, target.output, target.columns, target.scale)
        return self._trees.get_or_build(
            key, lambda: _checked_tree(model, target, background, f, self._fits))

    def _linear(self, model: LoadedModel, target: Target, background: Background,
                fn: Callable[[Target], ModelFn], background_key: str, explicit: bool) -> Choice:
        """Closed-form attributions when f is affine on this background, else a sampler."""
        fit = self._fit(model, target, background, fn, background_key)
        if isinstance(fit, AffineFit):
            return Choice(LinearShap(fit), target)
        note = (f"method linear unavailable ({fit}); fell back to auto",)
        return Choice(self.registry["auto"], target, note if explicit else ())

    def _fit(self, model: LoadedModel, target: Target, background: Background,
             fn: Callable[[Target], ModelFn], background_key: str) -> AffineFit | str:
        """The target's affine fit on this background, or why there is none (cached). A model
        whose inputs are ids is never probed: between or beyond valid ids it is undefined."""
        if model.onnx.discrete_inputs:
            name, why = next(iter(model.onnx.discrete_inputs.items()))
            return f"input {name!r} {why}: the model takes ids, not real-valued features"
        key = (model.sha256, background_key, target.output, target.columns, target.scale)
        return self._affine.get_or_build(
            key, lambda: _probed_fit(fn(target), background, target, model.onnx.batch_dtype))


def _probed_fit(f: ModelFn, background: Background, target: Target,
                dtype: type) -> AffineFit | str:
    """fit_affine, or why not. The probes are ours, not the caller's: a model that fails on
    them is not linear, and the request must not fail for it."""
    try:
        fit = fit_affine(f, background, dtype=dtype)
    except Exception as err:
        log.warning("linear: the model failed on the affine probes: %s: %s",
                    type(err).__name__, err)
        return f"the model failed on the probe points ({type(err).__name__})"
    if fit is None:
        return f"the {target.scale} scale of {target.output!r} is not affine in the inputs"
    return fit


def tree_computes(model: LoadedModel, target: Target) -> bool:
    """Whether the trees' raw scores are the target: the margin (or the logit of a LOGISTIC
    output, which is the margin), or the output itself when no transform follows the trees."""
    trees = model.trees
    if trees is None or target.output not in trees["score_outputs"]:
        return False
    if target.scale == "margin":
        return True
    if target.scale == "logit":
        return target.output in model.onnx.logit_is_margin
    return trees["post_transform"] == "NONE"


def tree_scale(model: LoadedModel, target: Target) -> Target | None:
    """The same output and columns on the scale the trees compute, if any."""
    for scale in ("margin", "identity"):
        if scale == "margin" and target.output not in model.onnx.margin_outputs:
            continue
        moved = replace(target, scale=scale)
        if tree_computes(model, moved):
            return moved
    return None


def _checked_tree(model: LoadedModel, target: Target, background: Background,
                  f: ModelFn, fits: FitCache) -> TreeShap | str:
    """TreeShap for the target's columns, if its predictions match onnxruntime's on the
    background (a last guard against a graph the parser misread)."""
    assert model.trees is not None
    tree = TreeShap(model.trees, target.columns, fits=fits)
    rows = background.data[:256]  # (rows, features)
    mine = predict_margin(model.trees, rows)[:, list(target.columns)]  # (rows, outputs)
    theirs = f(rows)
    spread = max(float(np.ptp(theirs)), 1.0)
    if not np.allclose(mine, theirs, rtol=0, atol=AGREEMENT_TOL * spread):
        return "the trees read from the graph disagree with onnxruntime on the background"
    return tree
