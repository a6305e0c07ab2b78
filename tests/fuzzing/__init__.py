"""Random and malformed requests for every RPC of every service (issue 11), sent as raw bytes
to a real server.

A seeded `numpy.random.Generator` draws valid requests and mutations of them (shapes, dtypes,
byte lengths, special values, names, tensor names, budgets, seeds, targets, objectives,
bounds, rates, oversize strings), wire garbage, and for streams client cancellations; `run`
sends them from a few client threads and checks every answer message. Shared by
tests/test_fuzz.py and benchmarks/fuzz.py (`make fuzz`, 10,000).

models.py: the repository and what is known of each model; core.py: cases, the generator and
the shared mutations; explainer.py, layers.py, datasets.py: each service's requests;
harness.py: sending, checking and counting.
"""

from __future__ import annotations

from collections.abc import Sequence

from tests.fuzzing import datasets, explainer, layers
from tests.fuzzing.core import SETTINGS, Case, Fuzzer, Rpc
from tests.fuzzing.harness import (
    FAILING_STATUSES,
    Outcome,
    Summary,
    channel,
    default_backgrounds,
    health,
    non_finite,
    ordinary_calls,
    run,
)
from tests.fuzzing.models import ModelSpec, build_repository, read_specs

RPCS: tuple[Rpc, ...] = (*explainer.RPCS, *layers.RPCS, *datasets.RPCS)
SERVICES = tuple(dict.fromkeys(r.service for r in RPCS if r.service != explainer.HEALTH))


def fuzzer(specs: Sequence[ModelSpec], seed: int) -> Fuzzer:
    """The generator over every RPC of every service."""
    return Fuzzer(specs, seed, RPCS)


__all__ = ["FAILING_STATUSES", "RPCS", "SERVICES", "SETTINGS", "Case", "Fuzzer", "ModelSpec",
           "Outcome", "Rpc", "Summary", "build_repository", "channel", "default_backgrounds",
           "fuzzer", "health", "non_finite", "ordinary_calls", "read_specs", "run"]
