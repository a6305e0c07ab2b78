"""Fuzzing every RPC of every service (issue 11): random and malformed requests against a real
server on the bundled models plus an INT64 token-id model, a two-input model and an image model
with an empty and a -inf weight (tests/fuzzing/), streams read to the end or cancelled, counted
per RPC and status, with the checks made after the run.

Usage: python -m benchmarks.fuzz [--seed 11] [--count 10000] [--clients 4]   (`make fuzz`)
Writes section `fuzz` of docs/benchmarks.md, stamped with this command; `make bench` runs it too
(`--quick`: 2,000 requests). Exits 1 when a request failed or a check after the run did not hold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks.run import DOC, HEADER, machine, ordered, replace_section
from service.api.server import start
from tests import fuzzing as fz
from tests.conftest import settings_for

SEED, COUNT, QUICK_COUNT, CLIENTS = 11, 10_000, 2_000, 4
FAILURE_CLASSES = 20  # listed in the docs, most frequent first


@dataclass(frozen=True)
class Result:
    """The outcomes and what held after the run."""

    summary: fz.Summary
    health: dict[str, str]
    changed_defaults: dict[str, tuple[str, str]]  # model -> (sha256 before, after)
    calls: dict[str, str]  # "<rpc> <model>" -> "OK" or why an ordinary call failed

    @property
    def passed(self) -> bool:
        return not self.summary.failures and not self.summary.internal_logged \
            and set(self.health.values()) == {"SERVING"} and not self.changed_defaults \
            and set(self.calls.values()) == {"OK"}


def fuzz(seed: int, count: int, clients: int) -> Result:
    """Start a server on a fresh repository, send `count` cases, check the server after."""
    with tempfile.TemporaryDirectory() as tmp:
        root = fz.build_repository(Path(tmp) / "models")
        app = start(settings_for(root, **fz.SETTINGS))
        try:
            with fz.channel(app.port) as channel:
                specs = fz.read_specs(channel, root)
                before = fz.default_backgrounds(channel, specs)
                summary = fz.run(channel, fz.fuzzer(specs, seed).cases(count), fz.RPCS, clients)
                after = fz.default_backgrounds(channel, specs)
                changed = {m: (before[m], after[m]) for m in before if before[m] != after[m]}
                return Result(summary, fz.health(channel, fz.SERVICES), changed,
                              fz.ordinary_calls(channel, specs))
        finally:
            app.stop(grace=0)


def section(r: Result, seed: int, count: int, clients: int) -> str:
    """Markdown: what was sent, the status table, the checks and the failure classes."""
    s = r.summary
    streamed = ", ".join(f"{rpc.name} {s.messages[rpc.name]:,} (largest "
                         f"{s.largest[rpc.name] / 1024:,.0f} KiB)" for rpc in fz.RPCS
                         if rpc.streaming != "unary")
    lines = [
        "## Fuzzing every RPC (issue 11)", "",
        f"{count:,} requests (seed {seed}, {clients} client threads, {s.seconds:.0f} s) over "
        f"every RPC of {', '.join(name.split('.')[-1] for name in fz.SERVICES)} and health, "
        "against a real server on the bundled models plus an INT64 token-id model, a "
        "two-input model and an image model with an empty and a -inf weight: valid requests "
        "(tensor names from ListLayers) and mutations of them (shapes, datatypes, byte "
        "lengths, NaN / infinite / huge / denormal values, names, tensor names, reductions, "
        "budgets, deadlines, seeds, targets, accuracy goals, baselines, groups, objectives, "
        "bounds, steps and rates, oversize strings and uploads) and wire garbage (random, "
        "truncated, bit-flipped and mistyped messages; for ExplainDataset also in the middle "
        "of a stream, and streams without a job, with two, or with blocks and labels that do "
        "not fit). Streams are read to the end, every message checked (finite numbers, under "
        "the message limit: 4 MiB for Layers' streams, the server's 64 MiB send limit "
        "otherwise), or cancelled by the client (CANCELLED, sometimes with its side still "
        f"open); messages received: {streamed}. OK_NONFINITE is an OK answer with a "
        "non-finite number, OK_OVERSIZE a message over its limit; HANG a call unanswered after "
        "10 s.", "",
        s.table(), "",
        f"- failing answers (INTERNAL, UNKNOWN, OK_NONFINITE, OK_OVERSIZE, OK_UNPARSEABLE, "
        f"HANG): **{len(s.failures)}**; INTERNAL lines in the server log: "
        f"**{len(s.internal_logged)}**",
        f"- health afterwards: {', '.join(f'{k} {v}' for k, v in r.health.items())}",
        f"- `default` backgrounds changed: {_listing(r.changed_defaults) or 'none'}",
        f"- ordinary calls afterwards (Explain and GetActivations per model) failing: "
        f"{_listing({c: a for c, a in r.calls.items() if a != 'OK'}) or 'none'}",
    ]
    if s.failures or s.internal_logged:
        lines += ["", "Failure classes (RPC, status, message; the mutations seen in each):", ""]
        lines += [f"- {n} x `{key}`: {', '.join(f'{k} {c}' for k, c in kinds.most_common(4))}"
                  for n, key, kinds, _ in s.classes()[:FAILURE_CLASSES]]
        lines += ["", "The server's error log (the cause of each INTERNAL):", ""]
        lines += [f"- {n} x `{line}`" for line, n in s.error_lines().most_common(FAILURE_CLASSES)]
    return "\n".join(lines) + "\n"


def _listing(items: Mapping[str, object]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in items.items())


def run(quick: bool) -> str:
    """The section for `python -m benchmarks.run` (its failures are in the section)."""
    count = QUICK_COUNT if quick else COUNT
    return section(fuzz(SEED, count, CLIENTS), SEED, count, CLIENTS)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    args = parser.parse_args(args_list)
    result = fuzz(args.seed, args.count, args.clients)
    body = section(result, args.seed, args.count, args.clients)
    print(body, flush=True)
    if not result.passed:
        print(result.summary.report(), flush=True)
    command = " ".join(["python -m benchmarks.fuzz", *args_list]).strip()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    doc = DOC.read_text() if DOC.exists() else HEADER
    DOC.write_text(ordered(replace_section(doc, "fuzz", f"{body}\n_`{command}` on {when}; "
                                                        f"{machine()}._\n")))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
