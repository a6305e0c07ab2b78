"""Valid requests and mutations for the Layers service: tensor lists, weights, activations and
attention maps (streamed; real tensor names from ListLayers), and activation maximisation
(objectives, indices, bounds, steps, rates and regularisers with NaN, infinities and
extremes)."""

from __future__ import annotations

from service.api.layers import STREAM_CHUNK_BYTES  # layers.proto: each streamed message
from sidelight.v1 import layers_pb2 as lpb
from tests.fuzzing.core import (
    BUDGETS,
    INT32_EXTREMES,
    ODD_FLOATS,
    POOL,
    SEEDS,
    SHORT_TIMEOUTS_S,
    TIMEOUT_S,
    Fuzzer,
    Request,
    Rpc,
    m_string,
    mutate_tensors,
    regroup,
    resized,
    short_unless_bounded,
)
from tests.fuzzing.models import LayerSpec, ModelSpec

SERVICE = "sidelight.v1.Layers"
REDUCTIONS = ("", "none", "channel_mean", "top_k")
ODD_REDUCTIONS = ("max", "CHANNEL_MEAN", "top-k", "head_mean", "channel_mean ", "mean", "\x00",
                  "none\n", "x" * 20_000)
ATTENTION_REDUCTIONS = ("", "none", "head_mean")
STEPS = (-1, 0, 1, 4096, 4097, 2**31 - 1, -(2**31))
LAYER_ROWS = (0, 16, 256, 257)  # batches of rows the Layers calls get (the most is 256)


def valid_list_layers(f: Fuzzer) -> lpb.ListLayersRequest:
    spec = f.model()
    return lpb.ListLayersRequest(model=spec.name, version=f.version(spec))


def valid_weights(f: Fuzzer) -> lpb.WeightsRequest:
    """All weights, or 1-3 of them by name or alias."""
    spec = f.model(lambda s: bool(s.weights))
    names = f.some(spec.weights, 1, 3) if f.rng.random() < 0.6 else []
    return lpb.WeightsRequest(model=spec.name, version=f.version(spec), names=names)


def valid_activations(f: Fuzzer) -> lpb.ActivationsRequest:
    """1-3 rows and 1-3 listed tensors, whole or (tensors with channels) reduced."""
    spec = f.model(lambda s: bool(s.layers))
    reduction = f.pick(REDUCTIONS) if spec.channel_layers else f.pick(("", "none"))
    pool = spec.channel_layers if reduction in ("channel_mean", "top_k") else spec.layers
    return lpb.ActivationsRequest(
        model=spec.name, version=f.version(spec),
        inputs=f.tensors(spec, f.rows(spec, f.pick((1, 1, 2, 3)))),
        layers=[s.name for s in f.some(pool, 1, 3)], reduction=reduction,
        k=f.pick((0, 1, 2, 4, 8)))


def valid_attention(f: Fuzzer) -> lpb.AttentionRequest:
    """1-3 rows of a model with attention layers (or, a fifth of the time, of any model)."""
    spec = f.model(lambda s: s.attention) if f.rng.random() < 0.8 else f.model()
    return lpb.AttentionRequest(
        model=spec.name, version=f.version(spec),
        inputs=f.tensors(spec, f.rows(spec, f.pick((1, 1, 2, 3)))),
        reduction=f.pick(ATTENTION_REDUCTIONS))


def valid_maximize(f: Fuzzer) -> lpb.MaximizeRequest:
    """A model with a floating-point input: a logit (or a channel of a float tensor), from the
    background's mean or a row, in its range or the rows', 1-20 ms, few steps."""
    spec = f.model(lambda s: s.ascendable)
    r = lpb.MaximizeRequest(model=spec.name, version=f.version(spec),
                            budget_ms=float(f.rng.uniform(1.0, 20.0)),
                            seed=int(f.rng.integers(0, 2**63)), steps=f.pick((0, 1, 4, 16)),
                            jitter=f.pick((-1, 0, 1, 2)), blur_every=f.pick((-1, 0, 2)),
                            background=f.pick(POOL) if f.rng.random() < 0.2 else "")
    _objective(f, spec, r)
    if f.rng.random() < 0.5:
        row = f.rows(spec, 1)  # (1, features)
        r.start.extend(f.tensors(spec, row))
        r.low, r.high = (float(spec.rows.min()), float(spec.rows.max())) \
            if f.rng.random() < 0.5 else (0.0, 0.0)
    return r


def _objective(f: Fuzzer, spec: ModelSpec, r: lpb.MaximizeRequest) -> None:
    """A channel of a float tensor (when it has one, a third of the time), else a logit of the
    main output or of a named one."""
    if spec.channel_layers and f.rng.random() < 0.35:
        layer = f.pick(spec.channel_layers)
        r.objective, r.layer, r.index = "channel", layer.name, f.pick((0, 1, layer.channels - 1))
        return
    r.objective = f.pick(("", "logit"))
    if f.rng.random() < 0.5:
        r.index = int(f.rng.integers(0, min(spec.columns or (1,))))
        return
    k = int(f.rng.integers(len(spec.outputs)))
    r.output, r.index = spec.outputs[k], int(f.rng.integers(0, spec.columns[k]))


# --- mutations --------------------------------------------------------------------------------
def a_input(f: Fuzzer, r: lpb.ActivationsRequest | lpb.AttentionRequest) -> str:
    return mutate_tensors(f, r.inputs, "input")


def a_inputs(f: Fuzzer, r: lpb.ActivationsRequest | lpb.AttentionRequest) -> str:
    """Inputs dropped, duplicated, extra or none; or a batch of 0, 16, 256 or 257 rows."""
    if f.rng.random() < 0.5:
        return f"inputs:{regroup(f, r.inputs)}"
    return f"rows:{resized(f, r.model, r.inputs, LAYER_ROWS)}"


def _other_names(f: Fuzzer, spec: ModelSpec | None) -> list[str]:
    """Names that are not this model's tensors: weights, inputs, outputs' of other models,
    another model's tensors, weird ones."""
    other = f.model()
    names = [*other.weights[:3], *(s.name for s in other.layers[:3]), f.weird(), f.weird()]
    if spec is not None:
        names += [*spec.weights[:3], *(i.name for i in spec.inputs)]
    return names


def a_layers(f: Fuzzer, r: lpb.ActivationsRequest) -> str:
    """layers: none, a weird or wrong name among them, one name many times, 300 names, or
    every tensor of the model."""
    spec = f.spec_of(r.model)
    kind = f.pick(("none", "wrong", "repeated", "many", "all"))
    names = list(r.layers)
    if kind == "none":
        names = []
    elif kind == "wrong":
        names.insert(int(f.rng.integers(len(names) + 1)), f.pick(_other_names(f, spec)))
    elif kind == "repeated":
        names = names[:1] * 50
    elif kind == "many":
        names = [f"t{i}" for i in range(300)]
    elif spec is not None:
        names = [s.name for s in spec.layers]
    del r.layers[:]
    r.layers.extend(names)
    return f"layers:{kind}"


def a_reduction(f: Fuzzer, r: lpb.ActivationsRequest | lpb.AttentionRequest) -> str:
    """An unknown reduction, or a valid one on tensors it may not apply to."""
    r.reduction = f.pick((*ODD_REDUCTIONS, *REDUCTIONS, *ATTENTION_REDUCTIONS))
    return "reduction"


def a_k(f: Fuzzer, r: lpb.ActivationsRequest) -> str:
    """top_k with k at the int32 extremes, negative or zero."""
    r.reduction, r.k = "top_k", f.pick(INT32_EXTREMES)
    return f"k:{r.k}"


def w_names(f: Fuzzer, r: lpb.WeightsRequest) -> str:
    """names: a wrong one among them (a tensor, another model's weight), one many times, or
    1,000 names."""
    kind = f.pick(("wrong", "repeated", "many"))
    names = list(r.names)
    if kind == "wrong":
        names.insert(int(f.rng.integers(len(names) + 1)),
                     f.pick(_other_names(f, None) + [s.name for s in f.model().layers[:3]]))
    elif kind == "repeated":
        names = (names or ["x"])[:1] * 100
    else:
        names = [f"w{i}" for i in range(1000)]
    del r.names[:]
    r.names.extend(names)
    return f"names:{kind}"


def x_objective(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    """An unknown objective, or one whose other fields do not fit it."""
    kind = f.pick(("unknown", "channel-no-layer", "logit-with-layer", "channel-with-output"))
    if kind == "unknown":
        r.objective = f.pick(("neuron", "LOGIT", "Channel", "logit ", f.weird()))
    elif kind == "channel-no-layer":
        r.objective, r.layer = "channel", ""
    elif kind == "logit-with-layer":
        r.objective, r.layer = "logit", r.layer or _a_layer(f, r.model).name
    else:
        r.objective, r.output = "channel", r.output or "logits"
    return f"objective:{kind}"


def _a_layer(f: Fuzzer, model: str) -> LayerSpec:
    spec = f.spec_of(model) or f.model()
    return f.pick(spec.layers or f.model(lambda s: bool(s.layers)).layers)


def x_index(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    r.index = f.pick((*INT32_EXTREMES, 9, 10, 16))
    return f"index:{r.index}"


def x_target(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    """output or layer: weird, a weight, another model's, an integer or shapeless tensor."""
    spec = f.spec_of(r.model)
    name = f.pick([*_other_names(f, spec), _a_layer(f, r.model).name])
    if r.objective == "channel" or f.rng.random() < 0.3:
        r.layer = name
        return "layer"
    r.output = name
    return "output"


def x_start(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    """start: a tensor mutation, dropped/duplicated/extra tensors, or 0, 2 or 256 rows."""
    kind = f.pick(("tensor", "tensor", "regroup", "rows"))
    if kind == "tensor":
        return mutate_tensors(f, r.start, "start")
    if kind == "regroup":
        return f"start:{regroup(f, r.start)}"
    return f"start-rows:{resized(f, r.model, r.start, (0, 2, 256))}"


def x_bounds(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    """low and high: NaN, infinite, huge, denormal, equal or reversed."""
    kind = f.pick(("odd", "odd", "equal", "reversed"))
    if kind == "odd":
        r.low, r.high = f.pick((r.low, *ODD_FLOATS)), f.pick((r.high, *ODD_FLOATS))
    elif kind == "equal":
        r.low = r.high = f.pick((0.0, 1.0, 1e308))
    else:
        r.low, r.high = 1.0, -1.0
    return f"bounds:{kind}"


def x_budget(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    r.budget_ms = f.pick(BUDGETS)
    return f"budget:{r.budget_ms:g}"


def x_seed(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    r.seed = f.pick(SEEDS)
    return "seed"


def x_steps(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    r.steps = f.pick(STEPS)
    return f"steps:{r.steps}"


def x_rates(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    """learning_rate, l2 or blur_sigma: NaN, infinite, negative, denormal or huge."""
    which = f.pick(("learning_rate", "l2", "blur_sigma"))
    setattr(r, which, f.pick((*ODD_FLOATS, 1e3, 1e30)))
    return which


def x_counts(f: Fuzzer, r: lpb.MaximizeRequest) -> str:
    """jitter or blur_every at the int32 extremes."""
    which = f.pick(("jitter", "blur_every"))
    setattr(r, which, f.pick((*INT32_EXTREMES, -2, 64)))
    return which


def maximize_timeout(f: Fuzzer, r: Request) -> float:
    return short_unless_bounded(f, r.budget_ms)


def sometimes_short(f: Fuzzer, r: Request) -> float:
    """A short deadline a tenth of the time (the model's default budget applies otherwise)."""
    return f.pick(SHORT_TIMEOUTS_S) if f.rng.random() < 0.1 else TIMEOUT_S


def path(rpc: str) -> str:
    return f"/{SERVICE}/{rpc}"


RPCS = (
    Rpc("ListLayers", path("ListLayers"), lpb.ListLayersResponse, 0.03, valid_list_layers,
        (m_string,)),
    Rpc("GetActivations", path("GetActivations"), lpb.ActivationChunk, 0.10, valid_activations,
        (a_input, a_input, a_inputs, a_layers, a_layers, a_reduction, a_k, m_string),
        streaming="server", timeout=sometimes_short, message_limit=STREAM_CHUNK_BYTES),
    Rpc("GetWeights", path("GetWeights"), lpb.WeightsResponse, 0.04, valid_weights,
        (w_names, w_names, m_string)),
    Rpc("GetAttention", path("GetAttention"), lpb.AttentionChunk, 0.06, valid_attention,
        (a_input, a_input, a_inputs, a_reduction, m_string), streaming="server",
        timeout=sometimes_short, message_limit=STREAM_CHUNK_BYTES),
    Rpc("Maximize", path("Maximize"), lpb.MaximizeResponse, 0.09, valid_maximize,
        (x_objective, x_index, x_target, x_start, x_start, x_bounds, x_bounds, x_budget, x_seed,
         x_steps, x_rates, x_rates, x_counts, m_string), timeout=maximize_timeout),
)
