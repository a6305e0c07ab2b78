"""Sending cases to a real server and checking what comes back: every answer message parsed,
its numbers finite (doubles, floats and float tensors, at any depth), its size under the RPC's
message limit; statuses counted per RPC with the server's error log; the checks
made after a run (health, stored backgrounds, ordinary calls still answered)."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from sidelight.v1 import layers_pb2 as lpb
from sidelight.v1 import layers_pb2_grpc as lpb_grpc
from tests.fuzzing.core import TIMEOUT_S, Case, Rpc, clip, decoded, encode
from tests.fuzzing.models import ModelSpec

FAILING_STATUSES = ("INTERNAL", "UNKNOWN", "HANG", "OK_NONFINITE", "OK_OVERSIZE",
                    "OK_UNPARSEABLE")
CLIENT_LIMIT = 256 << 20  # the client's receive limit: the server's own limits must show
FLOAT_TYPES = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
MAY_BE_NONFINITE = {  # fields whose contract allows NaN (full names)
    "sidelight.v1.DatasetShapleyResult.feature_values"}  # NaN for a group of features
INTERNAL_LOG = "internal error in"  # the servicer's line for an INTERNAL (servicer.call)


def channel(port: int) -> grpc.Channel:
    """A plaintext channel to the server that receives answers up to CLIENT_LIMIT."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", CLIENT_LIMIT)])


# --- checking answers -------------------------------------------------------------------------
def check_answer(rpc: Rpc, answer: bytes) -> tuple[str, str] | None:
    """(failing status, why) for an OK message that is wrong: a streamed one over the stream's
    limit, one that does not parse, or one holding a non-finite number; else None."""
    if rpc.message_limit is not None and len(answer) > rpc.message_limit:
        return "OK_OVERSIZE", f"{len(answer)} bytes, over the {rpc.message_limit}-byte limit"
    try:
        message = rpc.response.FromString(answer)
    except DecodeError as err:
        return "OK_UNPARSEABLE", f"{rpc.response.__name__}: {err}"
    problem = non_finite(message)
    return None if problem is None else ("OK_NONFINITE", problem)


def non_finite(message: Message, prefix: str = "") -> str | None:
    """The first non-finite number of a message ("path: values"), at any depth: double and
    float fields, map values and the values of float tensors (or a tensor that does not
    decode); None when there is none."""
    for fd, value in message.ListFields():
        if fd.full_name in MAY_BE_NONFINITE:
            continue
        where = f"{prefix}{fd.name}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            problem = _map_values(fd, value, where)
        elif fd.message_type is not None:
            problem = _messages(list(value) if fd.is_repeated else [value], fd.is_repeated,
                                where)
        else:
            problem = _floats(fd, list(value) if fd.is_repeated else [value], where)
        if problem:
            return problem
    return None


def _floats(fd: FieldDescriptor, values: list[Any], where: str) -> str | None:
    if fd.type not in FLOAT_TYPES:
        return None
    return _finite(np.asarray(values, np.float64), where)


def _finite(values: np.ndarray, where: str) -> str | None:
    bad = values[~np.isfinite(values)]
    return f"{where}: {', '.join(sorted({str(v) for v in bad.ravel()}))}" if bad.size else None


def _map_values(fd: FieldDescriptor, mapping: Any, where: str) -> str | None:
    values = list(mapping.values())
    assert fd.message_type is not None  # a map field's entry type
    kind = fd.message_type.fields_by_name["value"]
    if kind.message_type is not None:
        return _messages(values, True, where)
    return _floats(kind, values, where)


def _messages(items: list[Message], repeated: bool, where: str) -> str | None:
    for i, item in enumerate(items):
        at = f"{where}[{i}]" if repeated else where
        problem = tensor_problem(item, at) if isinstance(item, pb.Tensor) \
            else non_finite(item, f"{at}.")
        if problem:
            return problem
    return None


def tensor_problem(t: pb.Tensor, where: str) -> str | None:
    """Why an answer's tensor is wrong: it does not decode, or a float value is non-finite."""
    try:
        values = decoded(t)
    except (KeyError, ValueError, TypeError) as err:
        return f"{where}: does not decode ({type(err).__name__}: {clip(str(err), 80)})"
    if values.dtype.kind != "f":
        return None
    return _finite(values.astype(np.float64), f"{where} ({t.datatype} {list(t.shape)})")


# --- sending ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What came back: a status name (HANG and the OK_* failures are the harness's), its
    details, the time it took, the messages received and the server's error log lines
    emitted meanwhile (one client only)."""

    case: Case
    status: str
    details: str
    seconds: float
    received: int = 0
    largest: int = 0  # bytes of the largest answer message
    log: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status in FAILING_STATUSES

    @property
    def key(self) -> str:
        """The failure class: RPC, status and message (the server's log line when known)."""
        message = re.sub(r"[0-9]+", "N", self.log[0] if self.log else self.details)
        return f"{self.case.rpc} {self.status}: {clip(message, 160)}"

    def describe(self) -> str:
        log = f" | log: {' / '.join(self.log)}" if self.log else ""
        return f"{self.status}: {clip(self.details, 200)}{log}\n    {self.case.describe()}"


def caller(ch: grpc.Channel, rpc: Rpc) -> Any:
    """The RPC's callable on raw bytes (no serializers: cases are bytes)."""
    make = {"unary": ch.unary_unary, "server": ch.unary_stream, "bidi": ch.stream_stream}
    return make[rpc.streaming](rpc.path)


def answers(call: Any, rpc: Rpc, case: Case) -> Iterator[bytes]:
    """The answer messages of one call, read to the end; a stream is cancelled by the client
    `cancel_s` after it starts when the case says so (its side kept open until then when
    `hold_open`)."""
    if rpc.streaming == "unary":
        yield call(case.payload, timeout=case.timeout_s)
        return
    done = threading.Event()

    def requests() -> Iterator[bytes]:
        yield from case.payloads
        if case.hold_open:
            done.wait(case.timeout_s)

    stream = call(requests() if rpc.streaming == "bidi" else case.payload,
                  timeout=case.timeout_s)
    timer = None if case.cancel_s is None else threading.Timer(case.cancel_s, stream.cancel)
    if timer is not None:
        timer.start()
    try:
        yield from stream
    finally:
        done.set()
        if timer is not None:
            timer.cancel()


def send(call: Any, rpc: Rpc, case: Case) -> Outcome:
    """One call with the case's timeout, every answer message checked; a client deadline hit
    at TIMEOUT_S counts as a hang. A wrong message fails the call whatever its status."""
    start, received, largest, problem = time.perf_counter(), 0, 0, None
    status, details = "OK", ""
    try:
        for answer in answers(call, rpc, case):
            received, largest = received + 1, max(largest, len(answer))
            problem = problem or check_answer(rpc, answer)
    except grpc.RpcError as err:
        status, details = err.code().name, err.details() or ""
    seconds = time.perf_counter() - start
    if status == "DEADLINE_EXCEEDED" and case.timeout_s >= TIMEOUT_S \
            and seconds >= 0.99 * TIMEOUT_S:
        status = "HANG"
    if problem is not None:
        status, details = problem
    return Outcome(case, status, details, seconds, received, largest)


class ServerLog(logging.Handler):
    """ERROR lines logged in this process (the in-process server logs every INTERNAL with the
    exception and where it was raised; grpc logs requests it could not deserialize)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.name}: {record.getMessage().splitlines()[0]}"
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            line += f" ({type(err).__name__}: {clip(str(err), 120)})"
        self.lines.append(clip(line, 400))


@contextmanager
def server_log() -> Iterator[ServerLog]:
    handler = ServerLog()
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


# --- counting ---------------------------------------------------------------------------------
@dataclass
class Summary:
    """Status counts per RPC (in `rpcs`' order), every failing outcome, and the server's error
    log."""

    rpcs: tuple[Rpc, ...]
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[Outcome] = field(default_factory=list)
    valid_ok: Counter[str] = field(default_factory=Counter)  # unmutated requests answered OK
    messages: Counter[str] = field(default_factory=Counter)  # answer messages received per RPC
    largest: Counter[str] = field(default_factory=Counter)  # bytes of the largest, per RPC
    server_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        self.counts[(outcome.case.rpc, outcome.status)] += 1
        self.messages[outcome.case.rpc] += outcome.received
        self.largest[outcome.case.rpc] = max(self.largest[outcome.case.rpc], outcome.largest)
        if outcome.failed:
            self.failures.append(outcome)
        if outcome.status == "OK" and outcome.case.kind == "valid":
            self.valid_ok[outcome.case.rpc] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def sent(self, rpc: str) -> int:
        return sum(n for (r, _), n in self.counts.items() if r == rpc)

    @property
    def internal_logged(self) -> list[str]:
        """The server's INTERNAL log lines: also those of calls the client had cancelled."""
        return [line for line in self.server_errors if INTERNAL_LOG in line]

    def statuses(self) -> list[str]:
        seen = {s for _, s in self.counts}
        return sorted(seen, key=lambda s: (s != "OK", s in FAILING_STATUSES, s))

    def table(self) -> str:
        """Markdown: one row per RPC (with its service), one column per status seen."""
        statuses = self.statuses()
        lines = [f"| service | RPC | requests | {' | '.join(statuses)} |",
                 f"|---|---|---:|{'---:|' * len(statuses)}"]
        for rpc in self.rpcs:
            row = [self.counts[(rpc.name, s)] for s in statuses]
            lines.append(f"| {rpc.service.split('.')[-1]} | {rpc.name} | {sum(row):,} | "
                         f"{' | '.join(f'{n:,}' for n in row)} |")
        totals = [sum(self.counts[(r.name, s)] for r in self.rpcs) for s in statuses]
        lines.append(f"| all | | {self.total:,} | {' | '.join(f'{n:,}' for n in totals)} |")
        return "\n".join(lines)

    def classes(self) -> list[tuple[int, str, Counter[str], Outcome]]:
        """Failures grouped by RPC, status and message (numbers blanked), most frequent first:
        (count, class, the mutations seen in it, its first outcome)."""
        sizes: Counter[str] = Counter()
        kinds: dict[str, Counter[str]] = {}
        first: dict[str, Outcome] = {}
        for o in self.failures:
            sizes[o.key] += 1
            kinds.setdefault(o.key, Counter()).update(o.case.kind.split("|"))
            first.setdefault(o.key, o)
        return [(n, key, kinds[key], first[key]) for key, n in sizes.most_common()]

    def report(self, limit: int = 15) -> str:
        """What failed, compactly: each class with its mutations and its first request, then
        the server's error log lines (one per INTERNAL raised in a servicer)."""
        lines = [f"{len(self.failures)} failing answers of {self.total}:"]
        for n, key, kinds, example in self.classes()[:limit]:
            lines += [f"  {n} x {key}  [{_top(kinds)}]", f"      e.g. {example.case.describe()}"]
        lines += ["server error log:"] + [f"  {n} x {e}" for e, n in
                                          self.error_lines().most_common(limit)]
        return "\n".join(lines)

    def error_lines(self) -> Counter[str]:
        """The server's error log lines with numbers and quoted names blanked, counted."""
        return Counter(re.sub(r"[0-9]+", "N", re.sub(r"'[^']*'", "'.'", e))
                       for e in self.server_errors)


def _top(kinds: Counter[str], n: int = 4) -> str:
    return ", ".join(f"{k} {c}" for k, c in kinds.most_common(n))


def run(ch: grpc.Channel, cases: Iterator[Case], rpcs: Sequence[Rpc],
        workers: int = 4) -> Summary:
    """Send every case from `workers` client threads; with one client, each outcome carries
    the server error lines logged during its call."""
    by_name = {r.name: r for r in rpcs}
    callers = {r.name: caller(ch, r) for r in rpcs}
    summary, lock = Summary(tuple(rpcs)), threading.Lock()

    def client(log: ServerLog) -> None:
        while True:
            with lock:
                case = next(cases, None)
            if case is None:
                return
            mark = len(log.lines)
            outcome = send(callers[case.rpc], by_name[case.rpc], case)
            if workers == 1:
                outcome = replace(outcome, log=tuple(log.lines[mark:]))
            with lock:
                summary.add(outcome)

    start = time.perf_counter()
    with server_log() as log, ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(client, log) for _ in range(workers)]:
            done.result()
        summary.server_errors = list(log.lines)
    summary.seconds = time.perf_counter() - start
    return summary


# --- after the run ----------------------------------------------------------------------------
def health(ch: grpc.Channel, services: Sequence[str]) -> dict[str, str]:
    """The health status of the server as a whole and of each service."""
    stub = health_pb2_grpc.HealthStub(ch)
    return {name or "(server)": health_pb2.HealthCheckResponse.ServingStatus.Name(
        stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S).status)
        for name in ("", *services)}


def default_backgrounds(ch: grpc.Channel, specs: Sequence[ModelSpec]) -> dict[str, str]:
    """Each model's `default` background sha256 (or the status that prevented reading it)."""
    stub = pb_grpc.ExplainerStub(ch)
    return {s.name: _sha(stub, s.name) for s in specs}


def _sha(stub: pb_grpc.ExplainerStub, model: str) -> str:
    try:
        return str(stub.GetBackground(pb.GetBackgroundRequest(model=model, name="default"),
                                      timeout=TIMEOUT_S).sha256)
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"


def ordinary_calls(ch: grpc.Channel, specs: Sequence[ModelSpec]) -> dict[str, str]:
    """'OK' per ordinary call that still gets a finite answer: per model an explanation and
    the activations of its first listed tensor ("<rpc> <model>" -> OK or what went wrong)."""
    stub, layers = pb_grpc.ExplainerStub(ch), lpb_grpc.LayersStub(ch)
    out = {f"Explain {s.name}": _answered(lambda s=s: _explained(stub, s)) for s in specs}
    out.update({f"GetActivations {s.name}": _answered(lambda s=s: _activations(layers, s))
                for s in specs if s.layers})
    return out


def _answered(call: Any) -> str:
    try:
        return str(call())
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"


def _inputs(spec: ModelSpec) -> list[pb.Tensor]:
    """The model's first two background rows as its inputs."""
    return [encode(i.name, part, i.datatype)
            for i, part in zip(spec.inputs, spec.split(spec.rows[:2]), strict=True)]


def _explained(stub: pb_grpc.ExplainerStub, spec: ModelSpec) -> str:
    """An ordinary request (two background rows, 100 ms): OK with a finite answer."""
    answer = stub.Explain(pb.ExplainRequest(model=spec.name, budget_ms=100.0, seed=1,
                                            inputs=_inputs(spec)), timeout=TIMEOUT_S)
    return non_finite(answer) or ("OK" if len(answer.rows) == 2 else f"{len(answer.rows)} rows")


def _activations(stub: lpb_grpc.LayersStub, spec: ModelSpec) -> str:
    chunks = list(stub.GetActivations(lpb.ActivationsRequest(
        model=spec.name, inputs=_inputs(spec), layers=[spec.layers[0].name]), timeout=TIMEOUT_S))
    problems = [p for p in map(non_finite, chunks) if p]
    return problems[0] if problems else ("OK" if chunks else "no chunk")
