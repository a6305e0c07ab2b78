"""`Client`: the Python client of a Sidelight sidecar (`from sidelight.client import Client`).

It needs grpcio, protobuf and numpy only. Every RPC goes through `Client._call`, which retries
UNAVAILABLE (the server starting, restarting or unreachable) and RESOURCE_EXHAUSTED (calls shed
beyond the server's in-flight limit) with exponential backoff and jitter within the call's
deadline; a RESOURCE_EXHAUSTED that names the request's own budget or a full store is final.
New RPCs (e.g. a `global_...` family) are one `_call` each plus a result type."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from service.client import datasets as jobs
from service.client.explanation import Explanation, from_response
from service.client.inputs import Inputs, baseline, groups, prepare
from service.client.layers import (
    Activation,
    AttentionMap,
    LayerList,
    Maximized,
    Weight,
    activations,
    attention_maps,
    layer_list,
    maximized,
    weight,
)
from service.client.wire import Array, tensor
from sidelight.v1 import datasets_pb2 as dpb
from sidelight.v1 import datasets_pb2_grpc as dpb_grpc
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from sidelight.v1 import layers_pb2 as lpb
from sidelight.v1 import layers_pb2_grpc as lpb_grpc

LOOKUP_TIMEOUT_S = 10.0  # ListModels, GetModel and the background RPCs
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # answers with maps of large images are large
FINAL_RESOURCE_EXHAUSTED = ("budget_ms:", "background:")  # the same request meets them again
RetryHook = Callable[["CallError", int, float], None]  # (error, attempt, seconds until next)


class CallError(Exception):
    """A call that failed: its gRPC status code, the server's message, attempts made."""

    def __init__(self, code: grpc.StatusCode, details: str, attempts: int = 1) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details, self.attempts = code, details, attempts

    @classmethod
    def of(cls, err: grpc.RpcError, attempts: int) -> CallError:
        return cls(err.code(), " ".join((err.details() or "").split()), attempts)

    @property
    def retryable(self) -> bool:
        """Worth sending again: the server is away or shedding load."""
        if self.code == grpc.StatusCode.UNAVAILABLE:
            return True
        return (self.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                and not self.details.startswith(FINAL_RESOURCE_EXHAUSTED)
                and "larger than max" not in self.details)  # gRPC's message size limit


@dataclass(frozen=True)
class Retry:
    """Exponential backoff: attempt n waits first_s * multiplier**(n-1), at most max_s, times a
    random factor in [0.5, 1] so that clients shed together do not return together."""

    attempts: int = 5
    first_s: float = 0.1
    max_s: float = 2.0
    multiplier: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.max_s, self.first_s * self.multiplier ** (attempt - 1)) \
            * rng.uniform(0.5, 1.0)


@dataclass(frozen=True)
class Options:
    """Everything of an ExplainRequest except the model and its inputs."""

    method: str = ""
    budget_ms: float = 0.0
    seed: int = 0
    classes: tuple[int, ...] = ()
    output: str = ""
    scale: str = ""
    background: str = ""
    target_error: float = 0.0
    max_evaluations: int = 0
    version: str = ""
    groups: pb.FeatureGroups | None = None
    baseline: pb.Baseline | None = None
    occlusion: pb.OcclusionWindow | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # reserved for fields added later

    def request(self, model: str, inputs: Inputs) -> pb.ExplainRequest:
        return pb.ExplainRequest(
            model=model, version=self.version, inputs=inputs.tensors(), method=self.method,
            target=pb.Target(output=self.output, classes=list(self.classes), scale=self.scale),
            budget_ms=self.budget_ms, seed=self.seed, background=self.background,
            target_error=self.target_error, max_evaluations=self.max_evaluations,
            groups=self.groups, baseline=self.baseline, occlusion=self.occlusion, **self.extra)


DEFAULT = Options()


class Client:
    """A connection to one Sidelight server: `Client("host:50051").explain(model, X)`.

    `timeout` is the default deadline of Explain in seconds (None: wait as long as the budget
    needs; a deadline also sets the budget when budget_ms is 0). `tls`, `root_certificates`
    (the CA's PEM; default the system's CAs) or a client certificate (`certificate_chain` and
    `private_key`, PEM, for mutual TLS) use a TLS channel; `token` is sent as
    `authorization: Bearer <token>` on every call. `on_retry(error, attempt, delay_s)` is told
    about each retry."""

    def __init__(self, address: str = "localhost:50051", *, timeout: float | None = None,
                 retry: Retry = Retry(), tls: bool = False,
                 root_certificates: bytes | None = None, certificate_chain: bytes | None = None,
                 private_key: bytes | None = None, token: str | None = None,
                 options: Sequence[tuple[str, Any]] = (), on_retry: RetryHook | None = None,
                 seed: int | None = None) -> None:
        if (certificate_chain is None) != (private_key is None):
            raise ValueError("certificate_chain and private_key go together (mutual TLS)")
        limits = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), *options]
        if tls or root_certificates is not None or certificate_chain is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key,
                                                       certificate_chain)
            self._channel = grpc.secure_channel(address, credentials, options=limits)
        else:
            self._channel = grpc.insecure_channel(address, options=limits)
        self._stub = pb_grpc.ExplainerStub(self._channel)
        self._layers = lpb_grpc.LayersStub(self._channel)
        self._datasets = dpb_grpc.DatasetsStub(self._channel)
        self.address, self.timeout, self.retry, self.on_retry = address, timeout, retry, on_retry
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._random = random.Random(seed)  # jitter only; never the global generator
        self._models: dict[tuple[str, str], pb.ModelInfo] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def models(self) -> list[pb.ModelInfo]:
        """Every model of the server, including those that failed to load (state FAILED)."""
        return list(self._call("ListModels", pb.ListModelsRequest(), LOOKUP_TIMEOUT_S).models)

    def model(self, name: str, version: str = "", refresh: bool = False) -> pb.ModelInfo:
        """A model's inputs, features, outputs and defaults (asked once per Client)."""
        key = (name, version)
        with self._lock:
            known = self._models.get(key)
        if known is not None and not refresh:
            return known
        info: pb.ModelInfo = self._call("GetModel", pb.GetModelRequest(model=name,
                                                                       version=version),
                                        LOOKUP_TIMEOUT_S)
        with self._lock:
            self._models[key] = info
        return info

    def prepare(self, model: str, X: Any, version: str = "") -> Inputs:
        """X as the model's input tensors (see `explain`); errors name what does not fit."""
        return prepare(self.model(model, version), X)

    def explain(self, model: str, X: Any, *, method: str = "", budget_ms: float = 0.0,
                seed: int = 0, classes: Sequence[int] = (), output: str = "", scale: str = "",
                background: str = "", target_error: float = 0.0, max_evaluations: int = 0,
                version: str = "", mask: Array | None = None,
                grid: int | Sequence[int] | None = None,
                patch: int | Sequence[int] | None = None, group_labels: Sequence[str] = (),
                baseline_kind: str | None = None, baseline_value: float = 0.0,
                blur_sigma: float = 0.0, window: Sequence[int] = (),
                strides: Sequence[int] = (), timeout: float | None = None) -> Explanation:
        """Explain the rows of X with `model`.

        X: a numpy array shaped like the model's input with the batch axis first (one row or
        image without it), a pandas DataFrame (columns matched to the feature names; other
        columns are ignored), a dict of arrays per input name, or for text models a string or
        list of strings (words looked up in the model's vocabulary, padded with id 0).
        method: "" (the model's default), "auto", "exact", "permutation", "kernel", "tree",
        "linear", "partition", "occlusion", "lime", ... mask/grid/patch: the players of an
        image or text (a group id per element, patches per axis, or a patch size).
        baseline_kind: what replaces a removed group ("zeros", "mean", "blur", "constant",
        "mask", "background"). window/strides: occlusion's window."""
        options = Options(
            method=method, budget_ms=budget_ms, seed=seed, classes=tuple(classes),
            output=output, scale=scale, background=background, target_error=target_error,
            max_evaluations=max_evaluations, version=version,
            groups=groups(mask, grid, patch, group_labels),
            baseline=baseline(baseline_kind, baseline_value, blur_sigma),
            occlusion=pb.OcclusionWindow(window=list(window), strides=list(strides))
            if window else None)
        return self.explain_inputs(model, self.prepare(model, X, version), options, timeout)

    def explain_inputs(self, model: str, inputs: Inputs, options: Options = DEFAULT,
                       timeout: float | None = None,
                       on_retry: RetryHook | None = None) -> Explanation:
        """Explain prepared inputs (see `prepare`), e.g. one chunk of a batch file."""
        return from_response(self.explain_response(model, inputs, options, timeout, on_retry),
                             inputs)

    def explain_response(self, model: str, inputs: Inputs, options: Options = DEFAULT,
                         timeout: float | None = None,
                         on_retry: RetryHook | None = None) -> pb.ExplainResponse:
        """The ExplainResponse message itself."""
        response: pb.ExplainResponse = self._call(
            "Explain", options.request(model, inputs),
            self.timeout if timeout is None else timeout, on_retry)
        return response

    def put_background(self, model: str, data: Any, *, name: str = "", version: str = "",
                       feature_names: Sequence[str] = ()) -> pb.PutBackgroundResponse:
        """Store a background (rows, features) for a model; a DataFrame's columns become the
        feature names unless given."""
        if hasattr(data, "columns") and hasattr(data, "to_numpy"):
            feature_names = feature_names or [str(c) for c in data.columns]
            data = data.to_numpy()
        values = np.asarray(data)
        values = values if values.dtype in (np.float32, np.float64) else values.astype(float)
        request = pb.PutBackgroundRequest(model=model, version=version, name=name,
                                          data=tensor("data", values),
                                          feature_names=list(feature_names))
        response: pb.PutBackgroundResponse = self._call("PutBackground", request,
                                                        LOOKUP_TIMEOUT_S)
        return response

    def get_background(self, model: str, name: str = "", version: str = "") -> pb.BackgroundInfo:
        info: pb.BackgroundInfo = self._call("GetBackground", pb.GetBackgroundRequest(
            model=model, version=version, name=name), LOOKUP_TIMEOUT_S)
        return info

    def list_backgrounds(self, model: str = "") -> list[pb.BackgroundInfo]:
        return list(self._call("ListBackgrounds", pb.ListBackgroundsRequest(model=model),
                               LOOKUP_TIMEOUT_S).backgrounds)

    def delete_background(self, model: str, name: str = "", version: str = "") -> bool:
        return bool(self._call("DeleteBackground", pb.DeleteBackgroundRequest(
            model=model, version=version, name=name), LOOKUP_TIMEOUT_S).deleted)

    # --- Layers: the network's tensors, activations, weights, attention, maximisation -------
    def list_layers(self, model: str, version: str = "") -> LayerList:
        """The tensors `activations` takes, the attention layers and Grad-CAM's layer."""
        return layer_list(self._call("ListLayers", lpb.ListLayersRequest(
            model=model, version=version), LOOKUP_TIMEOUT_S, stub=self._layers))

    def activations(self, model: str, X: Any, layers: Sequence[str], *, reduction: str = "",
                    k: int = 0, version: str = "",
                    timeout: float | None = None) -> dict[str, Activation]:
        """The named tensors for the rows of X (as `explain` takes it), by name; reduction
        "channel_mean" or "top_k" (k channels, 0 = 8) for large tensors."""
        request = lpb.ActivationsRequest(model=model, version=version,
                                         inputs=self.prepare(model, X, version).tensors(),
                                         layers=list(layers), reduction=reduction, k=k)
        return activations(self._call("GetActivations", request, self._timeout(timeout),
                                      stub=self._layers, stream=True))

    def weights(self, model: str, names: Sequence[str] = (), version: str = "") -> list[Weight]:
        """Statistics and a histogram of every weight (or the named ones)."""
        response = self._call("GetWeights", lpb.WeightsRequest(
            model=model, version=version, names=list(names)), LOOKUP_TIMEOUT_S,
            stub=self._layers)
        return [weight(w) for w in response.weights]

    def attention(self, model: str, X: Any, *, reduction: str = "", version: str = "",
                  timeout: float | None = None) -> list[AttentionMap]:
        """Every attention layer's probabilities (rows, heads, queries, keys) for the rows of X
        (texts are tokenized as `explain` does); reduction "head_mean" averages the heads."""
        request = lpb.AttentionRequest(model=model, version=version, reduction=reduction,
                                       inputs=self.prepare(model, X, version).tensors())
        return attention_maps(self._call("GetAttention", request, self._timeout(timeout),
                                         stub=self._layers, stream=True))

    def maximize(self, model: str, index: int = 0, *, objective: str = "logit",
                 output: str = "", layer: str = "", start: Any = None, low: float = 0.0,
                 high: float = 0.0, budget_ms: float = 0.0, seed: int = 0,
                 version: str = "", timeout: float | None = None,
                 **settings: Any) -> Maximized:
        """Gradient ascent on the input to maximise column `index` of an output's logit, or
        (objective="channel") channel `index` of `layer`; starts at `start` (one row) or the
        background's mean, within [low, high] (0, 0 = the background's range). `settings`:
        steps, learning_rate, l2, jitter, blur_every, blur_sigma, background."""
        tensors = self.prepare(model, start, version).tensors() if start is not None else []
        request = lpb.MaximizeRequest(model=model, version=version, objective=objective,
                                      index=index, output=output, layer=layer, start=tensors,
                                      low=low, high=high, budget_ms=budget_ms, seed=seed,
                                      **settings)
        return maximized(self._call("Maximize", request, self._timeout(timeout),
                                    stub=self._layers))

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # --- dataset-wide explanations (the Datasets service; service/client/datasets.py) -----
    # X: as `explain` takes it (streamed in chunks of `chunk_rows`), or None with
    # dataset="<stored background>". Every job also takes version, budget_ms (0: the deadline,
    # else the server's 60 s), seed, max_rows, max_evaluations, classes, output, scale,
    # chunk_rows, timeout and on_progress (called with each DatasetProgress).

    def permutation_importance(self, model: str, X: Any = None, y: Any = None, *,
                               metric: str = "", repeats: int = 0,
                               **job: Any) -> jobs.PermutationImportance:
        """The drop in `metric` (accuracy, log_loss, r2, mse against the labels y; without
        labels the mean absolute change of the output) when each feature is shuffled."""
        options = dpb.PermutationOptions(metric=metric, repeats=repeats)
        return jobs.importance_of(self._job(model, "permutation_importance", X, y,
                                            permutation=options, **job))

    def partial_dependence(self, model: str, X: Any = None,
                           features: Sequence[int | str] = (0,), *, resolution: int = 0,
                           percentiles: tuple[float, float] = (0.0, 0.0), spacing: str = "",
                           ice_rows: int = 0, output: int = 0,
                           **job: Any) -> jobs.Dependence | jobs.Dependence2D:
        """PDP and ICE of one feature, or the surface (decision regions) of a pair, by index
        or name, over scikit-learn's default grid unless told otherwise."""
        names = self.model(model, job.get("version", "")).feature_names
        options = dpb.DependenceOptions(
            features=jobs.feature_index(names, features), resolution=resolution,
            percentile_low=percentiles[0], percentile_high=percentiles[1], spacing=spacing,
            ice_rows=ice_rows)
        return jobs.dependence_of(self._job(model, "partial_dependence", X,
                                            dependence=options, **job), output)

    def dataset_shapley(self, model: str, X: Any = None, *, method: str = "",
                        background: str = "", target_error: float = 0.0, rows: bool = True,
                        interactions: bool = False, **job: Any) -> jobs.DatasetShapley:
        """Every row explained (as Explain would) and aggregated: mean |phi| per feature with
        its standard error; with rows, every row's values for a beeswarm."""
        options = dpb.ShapleyOptions(method=method, background=background,
                                     target_error=target_error, rows=rows,
                                     interactions=interactions)
        return jobs.shapley_of(self._job(model, "shapley", X, shapley=options, **job))

    def projection(self, model: str, X: Any = None, *, layer: str = "", components: int = 0,
                   **job: Any) -> jobs.Projection:
        """The rows (or a layer's activations on them) on their principal components."""
        options = dpb.ProjectionOptions(layer=layer, components=components)
        return jobs.projection_of(self._job(model, "projection", X, projection=options, **job))

    def live_importance(self, model: str, version: str = "",
                        window_seconds: float = 0.0) -> jobs.LiveImportance:
        """Mean |attribution| per feature over the answers the deployment served recently."""
        request = dpb.LiveImportanceRequest(model=model, version=version,
                                            window_seconds=window_seconds)
        return jobs.live_of(self._retrying(lambda left: self._datasets.GetLiveImportance(
            request, timeout=left, metadata=self._metadata), LOOKUP_TIMEOUT_S))

    def _job(self, model: str, kind: str, X: Any = None, y: Any = None, *, dataset: str = "",
             version: str = "", budget_ms: float = 0.0, seed: int = 0, max_rows: int = 0,
             max_evaluations: int = 0, classes: Sequence[int] = (), output: str = "",
             scale: str = "", chunk_rows: int = jobs.CHUNK_ROWS, timeout: float | None = None,
             on_progress: jobs.ProgressHook | None = None,
             **options: Any) -> dpb.DatasetResult:
        """One ExplainDataset call: the job, then the rows in chunks; retried like every call
        while none of its answers has arrived."""
        job = dpb.DatasetJob(model=model, version=version, kind=kind, dataset=dataset,
                             target=pb.Target(output=output, classes=list(classes),
                                              scale=scale),
                             budget_ms=budget_ms, seed=seed, max_rows=max_rows,
                             max_evaluations=max_evaluations, **options)
        inputs = None if X is None else self.prepare(model, X, version)
        labels = jobs.labels_of(y)
        jobs.requests(job, inputs, labels)  # labels that do not fit fail here, not in gRPC
        heard: list[dpb.DatasetProgress] = []

        def hear(p: dpb.DatasetProgress) -> None:
            heard.append(p)
            if on_progress is not None:
                on_progress(p)

        def once(left: float | None) -> dpb.DatasetResult:
            responses = self._datasets.ExplainDataset(
                jobs.requests(job, inputs, labels, chunk_rows), timeout=left,
                metadata=self._metadata)
            return jobs.collect(responses, hear)
        return self._retrying(once, timeout, resumable=lambda: not heard)  # type: ignore[no-any-return]

    def _call(self, rpc: str, request: Any, timeout: float | None,
              on_retry: RetryHook | None = None, stub: Any = None, stream: bool = False) -> Any:
        """One RPC with retries of transient failures, all within `timeout` seconds (a
        streamed answer is read whole, as a list, inside the retried attempt)."""
        method = getattr(self._stub if stub is None else stub, rpc)

        def once(left: float | None) -> Any:
            answer = method(request, timeout=left, metadata=self._metadata)
            return list(answer) if stream else answer
        return self._retrying(once, timeout, on_retry)

    def _retrying(self, once: Callable[[float | None], Any], timeout: float | None,
                  on_retry: RetryHook | None = None,
                  resumable: Callable[[], bool] = lambda: True) -> Any:
        """`once(seconds left)` until it returns, retrying transient failures with backoff
        within `timeout` seconds (and while `resumable()`: a job that has answered is not)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for attempt in range(1, self.retry.attempts + 1):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                return once(left)
            except grpc.RpcError as err:
                error = CallError.of(err, attempt)
                delay = self.retry.delay(attempt, self._random)
                late = deadline is not None and time.monotonic() + delay >= deadline
                if not error.retryable or attempt == self.retry.attempts or late \
                        or not resumable():
                    raise error from None
                hook = on_retry or self.on_retry
                if hook is not None:
                    hook(error, attempt, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")
