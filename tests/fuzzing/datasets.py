"""Valid requests and mutations for the Datasets service: ExplainDataset streams (a job, then
blocks of rows and labels; or a stored dataset) of every kind with small budgets, and the
sequences a client can get wrong (no job, a job twice, an empty stream, blocks of other shapes,
labels of the wrong length, tensors mutated, options out of range); live importance windows."""

from __future__ import annotations

import numpy as np

from service.api.server import MAX_MESSAGE_BYTES  # the server's send limit
from sidelight.v1 import datasets_pb2 as dpb
from sidelight.v1 import explainer_pb2 as pb
from tests.fuzzing.core import (
    BUDGETS,
    INT32_EXTREMES,
    INT64_EXTREMES,
    ODD_FLOATS,
    POOL,
    SEEDS,
    Fuzzer,
    Request,
    Rpc,
    encode,
    m_string,
    mutate_tensors,
    regroup,
    short_unless_bounded,
)
from tests.fuzzing.explainer import SAMPLERS, m_target, mutate_groups
from tests.fuzzing.models import ModelSpec

SERVICE = "sidelight.v1.Datasets"
KINDS = ("permutation_importance", "partial_dependence", "shapley", "projection")
METRICS = ("", "accuracy", "log_loss", "r2", "mse")
ODD_KINDS = ("", "shap", "PERMUTATION_IMPORTANCE", "pdp", "x" * 20_000, "projection ")
STORED = ("default", *POOL)  # stored datasets a job may name
Stream = list[dpb.DatasetRequest]


def valid_dataset(f: Fuzzer) -> Stream:
    """A job of any kind (a 5-40 ms budget, few repeats, a coarse grid, few rows), then 1-3
    blocks of 2-20 rows (labels alongside, a third of the time), or a stored dataset."""
    spec = f.model()
    job = dpb.DatasetJob(model=spec.name, version=f.version(spec), kind=f.pick(KINDS),
                         budget_ms=float(f.rng.uniform(5.0, 40.0)),
                         seed=int(f.rng.integers(0, 2**63)), max_rows=f.pick((0, 0, 5, 20)))
    _options(f, spec, job)
    if f.rng.random() < 0.25:
        job.dataset = f.pick(STORED)
        return [dpb.DatasetRequest(job=job)]
    labelled = f.rng.random() < 0.35
    blocks = [_block(f, spec, int(f.rng.integers(2, 21)), labelled)
              for _ in range(f.pick((1, 1, 2, 3)))]
    if f.rng.random() < 0.5:  # the job and the first rows in one message
        blocks[0].job.CopyFrom(job)
        return blocks
    return [dpb.DatasetRequest(job=job), *blocks]


def _options(f: Fuzzer, spec: ModelSpec, job: dpb.DatasetJob) -> None:
    """The kind's options, small and valid for the model."""
    d = max(len(spec.features), 1)
    if job.kind == "permutation_importance":
        job.permutation.metric, job.permutation.repeats = f.pick(METRICS), f.pick((0, 2))
    elif job.kind == "partial_dependence":
        job.dependence.features.extend(f.some(range(min(d, 8)), 1, 2))
        job.dependence.resolution = f.pick((0, 3, 5))
        job.dependence.ice_rows = f.pick((0, -1, 3))
    elif job.kind == "shapley":
        job.shapley.method = f.pick(SAMPLERS)
        job.shapley.rows, job.shapley.interactions = (bool(f.rng.random() < 0.5),
                                                      bool(f.rng.random() < 0.2))
    else:
        layers = [s.name for s in spec.layers[:6]]
        job.projection.layer = f.pick(("", "", *layers))
        job.projection.components = f.pick((0, 2, 3))


def _block(f: Fuzzer, spec: ModelSpec, rows: int, labelled: bool) -> dpb.DatasetRequest:
    """`rows` valid rows as the model's inputs, with labels (classes 0/1 or numbers)."""
    block = dpb.DatasetRequest(inputs=f.tensors(spec, f.rows(spec, rows)))
    if labelled:
        block.labels.CopyFrom(_labels(f, rows))
    return block


def _labels(f: Fuzzer, rows: int) -> pb.Tensor:
    if f.rng.random() < 0.5:
        return encode("labels", f.rng.integers(0, 2, rows), "INT64")
    return encode("labels", f.rng.normal(size=rows), f.pick(("FP32", "FP64")))


# --- stream mutations ---------------------------------------------------------------------------
def s_sequence(f: Fuzzer, stream: Stream) -> str:
    """The job missing, sent twice (again in a later message), an empty stream, a job with no
    rows, or 100 one-row blocks."""
    kind = f.pick(("no-job", "job-twice", "empty", "job-only", "many-blocks"))
    job = _job(stream)
    if not stream:  # emptied by an earlier mutation
        return "stream:empty"
    if kind == "no-job":
        stream[0].ClearField("job")
    elif kind == "job-twice":
        stream.append(dpb.DatasetRequest(job=job))
    elif kind == "empty":
        del stream[:]
    elif kind == "job-only":
        del stream[1:]
        stream[0].ClearField("inputs")
    else:
        spec = f.spec_of(job.model) or f.model()
        stream.extend(_block(f, spec, 1, False) for _ in range(100))
    return f"stream:{kind}"


def _job(stream: Stream) -> dpb.DatasetJob:
    """The stream's job (a copy; an empty one when it has none)."""
    job = dpb.DatasetJob()
    if stream and stream[0].HasField("job"):
        job.CopyFrom(stream[0].job)
    return job


def _blocks(stream: Stream) -> Stream:
    """The messages carrying rows (one is added when there is none)."""
    found = [m for m in stream if m.inputs]
    if not found:
        stream.append(dpb.DatasetRequest(inputs=[encode("", np.ones((2, 3)), "FP32")]))
        found = stream[-1:]
    return found


def s_block(f: Fuzzer, stream: Stream) -> str:
    """One block's tensors mutated, regrouped, or of another model's shape (the first block
    fixes the shape of the others)."""
    block = f.pick(_blocks(stream))
    kind = f.pick(("tensor", "tensor", "regroup", "other-model"))
    if kind == "tensor":
        return f"block:{mutate_tensors(f, block.inputs, 'input')}"
    if kind == "regroup":
        return f"block:{regroup(f, block.inputs)}"
    other = f.model()
    del block.inputs[:]
    block.inputs.extend(f.tensors(other, f.rows(other, int(f.rng.integers(1, 5)))))
    return "block:other-model"


def s_labels(f: Fuzzer, stream: Stream) -> str:
    """Labels one too many or too few, [rows, 7], non-finite, of an odd datatype, on some
    blocks only, or with no rows at all."""
    blocks = _blocks(stream)
    block = f.pick(blocks)
    rows = min(max(int(block.inputs[0].shape[0]), 0), 300) \
        if block.inputs and block.inputs[0].shape else 1  # the block's rows (a mutated shape: any)
    kind = f.pick(("length", "wide", "nonfinite", "dtype", "some", "alone"))
    if kind == "length":
        block.labels.CopyFrom(_labels(f, max(rows + f.pick((-1, 1)), 0)))
    elif kind == "wide":
        block.labels.CopyFrom(encode("labels", f.rng.normal(size=(rows, 7)), "FP32"))
    elif kind == "nonfinite":
        block.labels.CopyFrom(encode("labels", np.full(rows, f.pick((np.nan, np.inf))), "FP64"))
    elif kind == "dtype":
        block.labels.CopyFrom(_labels(f, rows))
        block.labels.datatype = f.pick(("BYTES", "BOOL", "FP16", "fp32", ""))
    elif kind == "some":
        for b in blocks[:1]:
            b.labels.CopyFrom(_labels(f, rows))
    else:
        stream.append(dpb.DatasetRequest(labels=_labels(f, 5)))
    return f"labels:{kind}"


def s_job(f: Fuzzer, stream: Stream) -> str:
    """A job field out of range: kind, names, budget, seed, row and evaluation caps, target,
    groups, or a stored dataset named alongside streamed rows."""
    if not stream or not stream[0].HasField("job"):
        return "job:none"
    job = stream[0].job
    which = f.pick(("kind", "string", "budget", "seed", "caps", "target", "groups", "dataset"))
    if which == "kind":
        job.kind = f.pick(ODD_KINDS)
    elif which == "string":
        return f"job:{m_string(f, job)}"
    elif which == "budget":
        job.budget_ms = f.pick(BUDGETS)
    elif which == "seed":
        job.seed = f.pick(SEEDS)
    elif which == "caps":
        job.max_rows, job.max_evaluations = f.pick(INT64_EXTREMES), f.pick(INT64_EXTREMES)
    elif which == "target":
        return f"job:{m_target(f, job)}"
    elif which == "groups":
        return f"job:groups:{mutate_groups(f, job.groups, f.spec_of(job.model) or f.model())}"
    else:
        job.dataset = f.pick((*STORED, f.weird()))
    return f"job:{which}"


def s_options(f: Fuzzer, stream: Stream) -> str:
    """The kind's options out of range (and sometimes for another kind): metric, repeats,
    features, grid, percentiles, spacing, ICE rows, local method, background, target error,
    layer, components."""
    if not stream or not stream[0].HasField("job"):
        return "options:none"
    job = stream[0].job
    spec = f.spec_of(job.model) or f.model()
    which = f.pick(("permutation", "dependence", "dependence", "shapley", "projection"))
    if f.rng.random() < 0.7:
        job.kind = {"permutation": KINDS[0], "dependence": KINDS[1], "shapley": KINDS[2],
                    "projection": KINDS[3]}[which]
    if which == "permutation":
        job.permutation.metric = f.pick((*METRICS, "auc", "ACCURACY", f.weird()))
        job.permutation.repeats = f.pick(INT32_EXTREMES)
    elif which == "dependence":
        _dependence(f, job.dependence, len(spec.features))
    elif which == "shapley":
        s = job.shapley
        s.method = f.pick(("occlusion", "saliency", "lime", "nope", *SAMPLERS))
        s.background = f.pick((*POOL, f.weird()))
        s.target_error = f.pick(ODD_FLOATS)
    else:
        job.projection.layer = f.pick((*spec.weights[:2], f.weird(), *(s.name for s in
                                                                      spec.layers[-2:])))
        job.projection.components = f.pick(INT32_EXTREMES)
    return f"options:{which}"


def _dependence(f: Fuzzer, d: dpb.DependenceOptions, features: int) -> None:
    """Features out of range, negative, three or repeated; odd grid, percentiles, spacing."""
    del d.features[:]
    d.features.extend(f.pick(([features], [-1], [0, 0], [0, 1, 2], [], [2**31 - 1], [0])))
    d.resolution = f.pick((*INT32_EXTREMES, 1, 10_000))
    d.percentile_low, d.percentile_high = f.pick(ODD_FLOATS), f.pick(ODD_FLOATS)
    d.spacing = f.pick(("uniform", "quantiles", "log", ""))
    d.ice_rows = f.pick(INT32_EXTREMES)


def valid_live(f: Fuzzer) -> dpb.LiveImportanceRequest:
    spec = f.model()
    return dpb.LiveImportanceRequest(model=spec.name, version=f.version(spec),
                                     window_seconds=f.pick((0.0, 1.0, 60.0, 3600.0)))


def l_window(f: Fuzzer, r: dpb.LiveImportanceRequest) -> str:
    r.window_seconds = f.pick((*ODD_FLOATS, 1e12))
    return "window"


def dataset_timeout(f: Fuzzer, stream: Request) -> float:
    """Short when the job's budget is the deadline's (0, or not a small positive number)."""
    return short_unless_bounded(f, _job(stream).budget_ms)


def path(rpc: str) -> str:
    return f"/{SERVICE}/{rpc}"


RPCS = (
    Rpc("ExplainDataset", path("ExplainDataset"), dpb.DatasetResponse, 0.12, valid_dataset,
        (s_sequence, s_block, s_block, s_labels, s_job, s_job, s_options, s_options),
        streaming="bidi", timeout=dataset_timeout, message_limit=MAX_MESSAGE_BYTES),
    Rpc("GetLiveImportance", path("GetLiveImportance"), dpb.LiveImportance, 0.03, valid_live,
        (m_string, l_window)),
)
