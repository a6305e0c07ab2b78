"""Valid requests and mutations for the Explainer service and health checks: explanations
(inputs, budgets, seeds, targets, accuracy goals, methods, batch sizes, feature groups,
baselines, occlusion windows, gradient options), background uploads (poisoned data, feature
names, oversize), reads, lists and deletes."""

from __future__ import annotations

from grpc_health.v1 import health_pb2

from sidelight.v1 import datasets_pb2 as dpb
from sidelight.v1 import explainer_pb2 as pb
from tests.fuzzing.core import (
    BUDGETS,
    INT32_EXTREMES,
    INT64_EXTREMES,
    MAX_BACKGROUND_ROWS,
    ODD_FLOATS,
    POOL,
    RECEIVE_LIMIT,
    SEEDS,
    TENSOR_MUTATIONS,
    UPLOAD_LIMIT,
    Fuzzer,
    Request,
    Rpc,
    clip,
    encode,
    m_string,
    mutate_tensors,
    regroup,
    resized,
    short_unless_bounded,
    t_values,
)
from tests.fuzzing.models import ModelSpec

SERVICE = "sidelight.v1.Explainer"
HEALTH = "grpc.health.v1.Health"
SAMPLERS = ("", "auto", "exact", "permutation", "kernel", "tree", "linear")
DEEP = ("partition", "lime", "occlusion", "saliency", "input_x_gradient", "smoothgrad",
        "integrated_gradients", "deeplift", "deepshap", "gradcam", "gradcam++")
VALID_METHODS = (*SAMPLERS, *SAMPLERS, *DEEP)  # the samplers twice as often
BASELINES = ("background", "zeros", "mean", "blur", "constant", "mask", "", "ZEROS", "noise")
SIZES = (0, 1, 2, 3, 4, 8, -1, 2**31 - 1, -(2**31))  # patch, grid, window and stride sizes
HEALTH_NAMES = ("", SERVICE, "sidelight.v1.Layers", "sidelight.v1.Datasets")
SCALES = ("identity", "logit", "margin", "", "LOGIT", " logit", "probability", "log", "margin\n")


def valid_explain(f: Fuzzer) -> pb.ExplainRequest:
    """1-3 background rows of a model, any method, a 1-20 ms budget, any seed."""
    spec = f.model()
    X = f.rows(spec, f.pick((1, 1, 1, 2, 3)))
    return pb.ExplainRequest(
        model=spec.name, version=f.version(spec), inputs=f.tensors(spec, X),
        method=f.pick(VALID_METHODS), budget_ms=float(f.rng.uniform(1.0, 20.0)),
        seed=int(f.rng.integers(0, 2**63)),
        background=f.pick(POOL) if f.rng.random() < 0.3 else "")


def valid_put(f: Fuzzer) -> pb.PutBackgroundRequest:
    """1-40 background rows under one of the POOL names, FP32 or FP64."""
    spec = f.model()
    X = f.rows(spec, int(f.rng.integers(1, 40)))
    names = spec.features if f.rng.random() < 0.3 else ()
    return pb.PutBackgroundRequest(
        model=spec.name, version=f.version(spec), name=f.pick(POOL),
        data=encode("data", X, f.pick(("FP32", "FP64")), f.rng.random() < 0.6),
        feature_names=names)


def valid_get_model(f: Fuzzer) -> pb.GetModelRequest:
    spec = f.model()
    return pb.GetModelRequest(model=spec.name, version=f.version(spec))


def valid_get_background(f: Fuzzer) -> pb.GetBackgroundRequest:
    spec = f.model()
    return pb.GetBackgroundRequest(model=spec.name, version=f.version(spec),
                                   name=f.pick(("", "default", *POOL)))


def valid_delete(f: Fuzzer) -> pb.DeleteBackgroundRequest:
    spec = f.model()
    return pb.DeleteBackgroundRequest(model=spec.name, version=f.version(spec),
                                      name=f.pick(POOL))


# --- Explain mutations ------------------------------------------------------------------------
def m_input(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """A tensor mutation on one input (an input is added when there is none)."""
    return mutate_tensors(f, r.inputs, "input")


def m_budget(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """budget_ms: 0 (deadline only), negative, NaN, infinite, tiny or huge."""
    r.budget_ms = f.pick(BUDGETS)
    return f"budget:{r.budget_ms:g}"


def m_seed(f: Fuzzer, r: pb.ExplainRequest) -> str:
    r.seed = f.pick(SEEDS)
    return f"seed:{r.seed}"


def m_target(f: Fuzzer, r: pb.ExplainRequest | dpb.DatasetJob) -> str:
    """target.classes out of range, negative, int32 extremes or a long list; scale unknown or
    another one; output unknown or another one."""
    kind = f.pick(("classes", "classes-long", "scale", "output"))
    if kind == "classes":
        r.target.classes.extend(f.pick((*INT32_EXTREMES, 0, 1)) for _ in range(3))
    elif kind == "classes-long":
        r.target.classes.extend(f.rng.integers(-1, 3, int(f.rng.integers(10, 400))).tolist())
    elif kind == "scale":
        r.target.scale = f.pick(SCALES)
    else:
        spec = f.spec_of(r.model) or f.model()
        r.target.output = f.pick((*spec.outputs, "nope", f.weird()))
    return f"target:{kind}"


def m_accuracy(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """target_error or max_evaluations: negative, NaN, infinite, tiny or huge."""
    if f.rng.random() < 0.5:
        r.target_error = f.pick(ODD_FLOATS)
        return f"target_error:{r.target_error:g}"
    r.max_evaluations = f.pick(INT64_EXTREMES)
    return f"max_evaluations:{r.max_evaluations}"


def m_method(f: Fuzzer, r: pb.ExplainRequest) -> str:
    r.method = f.pick((*VALID_METHODS, "EXACT", " tree", "tree\n", "shap", "Kernel", "auto+tree",
                       "x" * 20_000))
    return f"method:{clip(r.method, 12)}"


def m_inputs(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """Inputs dropped, duplicated, one extra, none at all, or only some named."""
    return f"inputs:{regroup(f, r.inputs)}"


def m_rows(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """Batches of 0 rows, the most allowed (256), one more (257), or of different sizes."""
    return f"rows:{resized(f, r.model, r.inputs, (0, 64, 256, 257))}"


# --- PutBackground mutations ------------------------------------------------------------------
def p_data(f: Fuzzer, r: pb.PutBackgroundRequest) -> str:
    """A tensor mutation of the uploaded matrix (poison values, shapes, dtypes, bytes)."""
    return f.pick((*TENSOR_MUTATIONS, t_values, t_values))(f, r.data)


def p_feature_names(f: Fuzzer, r: pb.PutBackgroundRequest) -> str:
    """feature_names: one too many or too few, weird or 20 kB long."""
    spec = f.spec_of(r.model) or f.model()
    names = list(spec.features)
    kind = f.pick(("fewer", "more", "weird"))
    new = {"fewer": names[:-1], "more": [*names, "extra"],
           "weird": [f.weird() for _ in names]}[kind]
    r.ClearField("feature_names")
    r.feature_names.extend(new)
    return f"feature_names:{kind}"


def p_oversize(f: Fuzzer, r: pb.PutBackgroundRequest) -> str:
    """More rows than max_background_rows, more bytes than max_upload_bytes, or a message over
    the server's receive limit."""
    spec = f.spec_of(r.model) or f.model()
    d = len(spec.features)
    kind = f.pick(("rows", "rows", "bytes", "message"))
    if kind == "message":
        r.data.CopyFrom(pb.Tensor(name="data", datatype="FP64", shape=[1, d],
                                  raw=bytes(RECEIVE_LIMIT + 1)))
        return "oversize:message"
    rows = MAX_BACKGROUND_ROWS + 1 if kind == "rows" else UPLOAD_LIMIT // (8 * d) + 1
    r.data.CopyFrom(encode("data", f.rows(spec, rows), "FP64" if kind == "bytes" else "FP32"))
    return f"oversize:{kind}"


# --- groups, baselines, occlusion and gradient options ----------------------------------------
def m_groups(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """A FeatureGroups mutation (on Explain's request or a dataset job)."""
    return f"groups:{mutate_groups(f, r.groups, f.spec_of(r.model) or f.model())}"


def mutate_groups(f: Fuzzer, g: pb.FeatureGroups, spec: ModelSpec) -> str:
    """A client mask (fitting the model's first input or not, ids in range or not, mutated
    like any tensor), patch or grid sizes, a hierarchy (cycles, ids out of range, huge),
    labels, the input's name; or several of them at once."""
    kind = f.pick(("mask", "mask", "patch", "grid", "hierarchy", "labels", "input", "both"))
    if kind in ("mask", "both"):
        g.mask.CopyFrom(_mask(f, spec))
        if f.rng.random() < 0.3:
            f.pick(TENSOR_MUTATIONS)(f, g.mask)
    if kind in ("patch", "both"):
        g.patch.extend(f.some(SIZES, 1, 3))
    if kind == "grid":
        g.grid.extend(f.some(SIZES, 0, 3))
    elif kind == "hierarchy":
        g.hierarchy.extend(_hierarchy(f, len(spec.features)))
    elif kind == "labels":
        g.labels.extend([f.weird() for _ in range(f.pick((1, 3, 1000)))])
    elif kind == "input":
        g.input = f.pick((*(i.name for i in spec.inputs), f.weird()))
    return kind


def _mask(f: Fuzzer, spec: ModelSpec) -> pb.Tensor:
    """Group ids shaped like the model's first input (or another shape), 0..d-1 with some -1,
    or ids with gaps, out of range or negative."""
    shape = spec.inputs[0].shape if spec.inputs and f.rng.random() < 0.8 else (3, 2)
    d = int(f.rng.integers(1, 5))
    ids = f.rng.integers(0, d, size=shape)  # (*shape,)
    kind = f.pick(("fit", "fit", "gap", "range", "negative", "batch"))
    if kind == "gap":
        ids = ids * 2
    elif kind in ("range", "negative") and ids.size:
        ids.flat[0] = d + 7 if kind == "range" else -5
    elif kind == "batch":
        ids = ids[None]
    if ids.size:
        ids.flat[-1] = -1
    return encode("mask", ids, f.pick(("INT64", "INT32", "FP32")))


def _hierarchy(f: Fuzzer, d: int) -> list[pb.GroupNode]:
    """Nodes over d groups: merging pairs (valid), with a cycle or an id out of range, or
    10,000 of them."""
    kind = f.pick(("pairs", "cycle", "range", "many"))
    if kind == "many":
        return [pb.GroupNode(children=[0, 1]) for _ in range(10_000)]
    nodes = [pb.GroupNode(children=[k, k + 1]) for k in range(0, max(d - 1, 1), 2)]
    if kind == "cycle" and nodes:
        nodes[0].children.append(d + len(nodes) - 1)
    elif kind == "range":
        nodes.append(pb.GroupNode(children=[f.pick((-1, d * 5, 2**31 - 1))]))
    return nodes


def m_baseline(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """baseline: any kind (some not for this modality, some unknown), odd value and sigma."""
    r.baseline.kind = f.pick(BASELINES)
    if f.rng.random() < 0.5:
        r.baseline.value = f.pick(ODD_FLOATS)
    if f.rng.random() < 0.5:
        r.baseline.sigma = f.pick((*ODD_FLOATS, 1e3, 1001.0))
    return f"baseline:{r.baseline.kind}"


def m_occlusion(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """method occlusion with windows and strides of odd sizes and counts, an odd input."""
    r.method = "occlusion"
    r.occlusion.window.extend(f.some(SIZES, 0, 4))
    r.occlusion.strides.extend(f.some(SIZES, 0, 4))
    if f.rng.random() < 0.3:
        r.occlusion.input = f.weird()
    return "occlusion"


def m_gradients(f: Fuzzer, r: pb.ExplainRequest) -> str:
    """A gradient method with an odd layer (a weight, another model's tensor, weird), noise,
    sample and step counts."""
    r.method = f.pick(DEEP[3:])
    o, spec = r.gradients, f.spec_of(r.model) or f.model()
    o.layer = f.pick(("", *(s.name for s in spec.layers[:4]), *spec.weights[:2], f.weird()))
    o.signed, o.relu = bool(f.rng.random() < 0.5), bool(f.rng.random() < 0.5)
    o.noise_level = f.pick((0.0, 0.15, *ODD_FLOATS))
    o.samples, o.steps = f.pick(INT32_EXTREMES), f.pick(INT32_EXTREMES)
    return f"gradients:{r.method}"


def explain_timeout(f: Fuzzer, r: Request) -> float:
    return short_unless_bounded(f, r.budget_ms)


def path(rpc: str) -> str:
    return f"/{SERVICE}/{rpc}"


RPCS = (
    Rpc("Explain", path("Explain"), pb.ExplainResponse, 0.42, valid_explain,
        (m_input, m_input, m_input, m_string, m_budget, m_seed, m_target, m_target, m_accuracy,
         m_method, m_inputs, m_rows, m_groups, m_groups, m_baseline, m_occlusion, m_gradients),
        timeout=explain_timeout),
    Rpc("ListModels", path("ListModels"), pb.ListModelsResponse, 0.03,
        lambda f: pb.ListModelsRequest()),
    Rpc("GetModel", path("GetModel"), pb.ModelInfo, 0.07, valid_get_model, (m_string,)),
    Rpc("PutBackground", path("PutBackground"), pb.PutBackgroundResponse, 0.16, valid_put,
        (p_data, p_data, p_data, p_data, m_string, m_string, p_feature_names, p_oversize),
        writes=True),
    Rpc("GetBackground", path("GetBackground"), pb.BackgroundInfo, 0.08, valid_get_background,
        (m_string,)),
    Rpc("ListBackgrounds", path("ListBackgrounds"), pb.ListBackgroundsResponse, 0.05,
        lambda f: pb.ListBackgroundsRequest(model=f.pick(("", f.model().name))), (m_string,)),
    Rpc("DeleteBackground", path("DeleteBackground"), pb.DeleteBackgroundResponse, 0.09,
        valid_delete, (m_string,), writes=True),
    Rpc("Check", f"/{HEALTH}/Check", health_pb2.HealthCheckResponse, 0.10,
        lambda f: health_pb2.HealthCheckRequest(service=f.pick(HEALTH_NAMES)), (m_string,)),
)
