"""Name -> estimator. Model-independent methods only: the tree and linear explainers are built
from a model's graph by the service, which adds them per model, and occlusion from the request's
window layout."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from explainers.base import Estimator
from explainers.errors import InvalidArgument, quoted
from explainers.perturbation.lime import Lime
from explainers.shapley.auto import AutoShapley
from explainers.shapley.exact import ExactShapley
from explainers.shapley.kernel import KernelShap
from explainers.shapley.partition import PartitionOwen
from explainers.shapley.permutation import PermutationShapley


def build_registry() -> Mapping[str, Estimator]:
    """A read-only mapping of the generic estimators; estimators hold no per-request state."""
    exact, permutation = ExactShapley(), PermutationShapley()
    methods: dict[str, Estimator] = {
        "exact": exact,
        "permutation": permutation,
        "kernel": KernelShap(),
        "auto": AutoShapley(exact, permutation),
        "partition": PartitionOwen(),
        "lime": Lime(),
    }
    return MappingProxyType(methods)


def lookup(registry: Mapping[str, Estimator], name: str) -> Estimator:
    """The estimator called `name` ("" means auto), or INVALID_ARGUMENT naming the choices."""
    key = name.strip().lower() or "auto"
    if key not in registry:
        known = ", ".join(sorted(registry))
        raise InvalidArgument(f"method: unknown method {quoted(name)}; known: {known}")
    return registry[key]
