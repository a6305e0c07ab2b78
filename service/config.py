"""Settings (environment variables with the SIDELIGHT_ prefix) and the explain.yaml schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MEMORY_LIMIT = 2 * 1024**3  # the shipped manifests' pod limit
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"),  # cgroup v2; "max" when unlimited
                 Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))  # v1; ~2^63 when unlimited


def memory_limit(files: tuple[Path, ...] = CGROUP_LIMITS) -> int:
    """The container's memory limit in bytes (cgroup v2, else v1), else DEFAULT_MEMORY_LIMIT."""
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return DEFAULT_MEMORY_LIMIT


def share_of_memory(fraction: float) -> Callable[[dict[str, Any]], int]:
    """A default that is `fraction` of SIDELIGHT_MEMORY_LIMIT_BYTES."""
    return lambda data: int(fraction * data["memory_limit_bytes"])


class Settings(BaseSettings):
    """Built once in `main` and passed down; every field can be set as SIDELIGHT_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="SIDELIGHT_")

    models_dir: Path = Field(Path("models"), description="Model repository (Triton layout).")
    host: str = Field("127.0.0.1", description="gRPC listen address (default loopback: the "
                      "quick start; a container sets 0.0.0.0 and tokens).")
    port: int = Field(50051, description="gRPC port (0 = any free port).")
    metrics_port: int = Field(9090, description="Prometheus /metrics port (0 = any, -1 = off).")
    health_port: int = Field(-1, description="Plaintext gRPC port serving only health checks, "
                             "for Kubernetes gRPC probes when TLS is on (-1 = off, 0 = any).")
    metrics_host: str | None = Field(None, description="Metrics listen address; unset = the "
                                     "gRPC address (127.0.0.1 keeps /metrics to the pod).")
    tls_cert: Path | None = Field(None, description="PEM certificate chain of the gRPC port; "
                                  "with tls_key turns TLS on. Re-read when the file changes.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: clients must present "
                                       "a certificate it signs (mutual TLS).")
    metrics_tls: bool = Field(False, description="Serve /metrics over HTTPS with tls_cert and "
                              "tls_key.")
    tokens_path: Path | None = Field(None, description="File, or directory of files (a mounted "
                                     "Secret), of `<name> <roles> <token>` lines; set = every "
                                     "call but health needs a bearer token. Re-read on change.")
    allow_insecure: bool = Field(False, description="Serve a non-loopback address without "
                                 "tokens (refused otherwise).")
    reflection: bool = Field(True, description="Serve gRPC reflection.")
    admin_rpcs: bool = Field(True, description="Serve PutBackground and DeleteBackground "
                             "(false: PERMISSION_DENIED for every caller).")
    uploads_per_client: int = Field(100, ge=0, description="PutBackground calls one client may "
                                    "make per upload window (0 = no limit).")
    upload_bytes_per_client: int = Field(1024**3, ge=0, description="Bytes of background data "
                                         "one client may upload per window (0 = no limit).")
    upload_window_seconds: float = Field(3600.0, gt=0, description="The window of the "
                                         "per-client upload limits.")
    shutdown_grace_seconds: float = Field(25.0, ge=0, description="On SIGTERM, how long the "
                                          "calls in flight may finish before they are cancelled "
                                          "(keep under terminationGracePeriodSeconds).")
    shutdown_drain_seconds: float = Field(1.0, ge=0, description="On SIGTERM, how long health "
                                          "reports NOT_SERVING before the port closes.")
    workers: int = Field(64, ge=1, description="gRPC handler threads: every call gets one on "
                         "arrival (its budget's clock starts then and admission sees it at "
                         "once); computing is limited to the cores, earliest deadline first.")
    ort_threads: int = Field(1, ge=1, description="onnxruntime intra-op threads per session.")
    default_budget_ms: float = Field(200.0, gt=0, description="Budget when neither the request, "
                                     "its deadline nor explain.yaml sets one.")
    max_budget_ms: float = Field(30000.0, gt=0, description="Upper bound on any budget.")
    deadline_margin_ms: float = Field(25.0, ge=0, description="Kept free before the client's "
                                      "deadline for serialisation and transport.")
    max_rows_per_request: int = Field(256, ge=1, description="Rows one Explain call may carry.")
    max_background_rows: int = Field(10000, ge=1, description="Rows a background may have.")
    max_background_cells: int = Field(5_000_000, ge=1, description="rows x features a "
                                      "background may have.")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Largest "
                                  "PutBackground tensor, in bytes.")
    max_in_flight: int = Field(16, ge=1, description="Explain calls served at once; more are "
                               "shed with RESOURCE_EXHAUSTED.")
    drift_enabled: bool = Field(True, description="Track input, prediction and attribution "
                                "drift and export it as metrics.")
    drift_window_seconds: float = Field(300.0, gt=0, description="Sliding window of recent "
                                        "requests that drift is computed over.")
    drift_reference_rows: int = Field(16, ge=0, description="Reference rows explained (at "
                                      "start-up, or just after it for slow models) as the "
                                      "attribution-drift reference (0 = off).")
    drift_max_features: int = Field(64, ge=1, description="Feature labels per model on drift "
                                    "metrics (the most important ones).")
    reload_interval_seconds: float = Field(10.0, ge=0, description="Seconds between looks at "
                                           "the model repository: new, replaced or removed "
                                           "models and changed explain.yaml files are loaded "
                                           "in the background and swapped in (0 = off).")
    log_level: str = Field("INFO", description="Python logging level.")
    redis_url: str | None = Field(None, description="Redis holding backgrounds and results for "
                                  "every replica: redis://[:password@]host:port/db, rediss:// "
                                  "for TLS. Unset = the in-memory store (one replica).")
    redis_tls_ca: Path | None = Field(None, description="CA bundle that signs the Redis server's "
                                      "certificate (rediss:// only; default: the system's).")
    redis_key_prefix: str = Field("sidelight:v1:", description="Prefix of every Redis key.")
    redis_timeout_ms: float = Field(1000.0, gt=0, description="Redis socket timeout per "
                                    "command; a slower Redis counts as down.")
    redis_connect_timeout_ms: float = Field(250.0, gt=0, description="Redis connect timeout.")
    redis_max_connections: int = Field(32, ge=1, description="Redis connection pool size.")
    redis_check_ms: float = Field(500.0, ge=0, description="Staleness bound: a local copy of a "
                                  "background is re-validated against Redis's sha256 at most "
                                  "this long after its last check, so a replaced background "
                                  "is used everywhere within this time.")
    background_local_cache: int = Field(64, ge=1, description="Decoded backgrounds each "
                                        "replica keeps in memory besides held uploads (LRU; "
                                        "also bounded by SIDELIGHT_BACKGROUND_STORE_BYTES).")
    result_cache_size: int = Field(1024, ge=0, description="Explanations kept for identical "
                                   "requests (LRU, per replica, and shared in Redis; also "
                                   "bounded by SIDELIGHT_RESULT_CACHE_BYTES); 0 = off.")
    memory_limit_bytes: int = Field(default_factory=memory_limit, ge=64 * 1024**2,
                                    description="Memory this replica may use; the byte bounds "
                                    "below default to shares of it. Default: the cgroup memory "
                                    "limit (the pod's), else 2 GiB.")
    background_store_bytes: int = Field(default_factory=share_of_memory(1 / 4), ge=0,
                                        description="Backgrounds held in memory: every named "
                                        "background of the in-memory store (uploads past it are "
                                        "refused), or with Redis the local copies plus uploads "
                                        "held while Redis is away (at most half).")
    background_cache_bytes: int = Field(default_factory=share_of_memory(1 / 4), ge=0,
                                        description="Backgrounds decoded for explaining (float64 "
                                        "rows and f(background) per target; LRU).")
    tree_cache_bytes: int = Field(default_factory=share_of_memory(1 / 16), ge=0,
                                  description="TreeSHAP tables per background, parsed trees and "
                                  "affine fits per target (LRU).")
    gradient_cache_bytes: int = Field(default_factory=share_of_memory(1 / 32), ge=0,
                                      description="Gradient graphs and their onnxruntime "
                                      "sessions per model, target and input shape (LRU).")
    result_cache_bytes: int = Field(default_factory=share_of_memory(1 / 32), ge=0,
                                    description="Explanations kept for identical requests "
                                    "(LRU, per replica); 0 = off.")
    result_cache_ttl_seconds: float = Field(600.0, gt=0, description="How long a cached "
                                            "explanation is served.")


class BackgroundConfig(BaseModel):
    """Where a model's default background comes from."""

    model_config = ConfigDict(extra="forbid")
    path: str
    max_rows: int | None = Field(None, ge=1)


class ImageConfig(BaseModel):
    """How an image input is read and cut into patches (the players of image explanations)."""

    model_config = ConfigDict(extra="forbid")
    layout: Literal["NCHW", "NHWC", "HW"] | None = Field(None, description="Axis order; "
                                                         "default: inferred from the shape.")
    patch: list[int] | int | None = Field(None, description="Patch size in pixels per spatial "
                                          "axis (one value: square).")
    grid: list[int] | int | None = Field(None, description="Patches per spatial axis.")


class TextConfig(BaseModel):
    """Token-id inputs: padding is never a player; the mask token is the text baseline."""

    model_config = ConfigDict(extra="forbid")
    pad_token: int | None = Field(0, description="Id of padding (never a player); null = none.")
    mask_token: int | None = Field(None, description="Id that replaces a removed token.")
    vocabulary: str | None = Field(None, description="File with one token per line (line = id), "
                                   "for labels and the CLI's --text.")


class GroupConfig(BaseModel):
    """A block of tabular features explained as one player (a one-hot encoding, say)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    features: list[str] = Field(min_length=1)


class OcclusionConfig(BaseModel):
    """Default window of method occlusion (per input axis; one value: every spatial axis)."""

    model_config = ConfigDict(extra="forbid")
    window: list[int] | int
    strides: list[int] | int | None = None


class ModelConfig(BaseModel):
    """explain.yaml: what ONNX cannot say about a model. Every key is optional."""

    model_config = ConfigDict(extra="forbid")
    features: list[str] | None = None
    output: str | None = None
    classes: list[int] | None = None
    class_names: list[str] | None = None
    scale: Literal["identity", "logit", "margin"] = "identity"
    method: str = "auto"
    budget_ms: float | None = Field(None, gt=0)
    background: BackgroundConfig | None = None
    allow_missing: bool = False
    drift_reference: BackgroundConfig | None = Field(None, description="Rows that drift is "
                                                     "measured against; default: the background.")
    modality: Literal["tabular", "image", "text"] | None = Field(None, description="How the "
                                                                  "inputs are read; default: "
                                                                  "inferred from the graph.")
    image: ImageConfig | None = None
    text: TextConfig | None = None
    baseline: Literal["background", "zeros", "mean", "blur", "constant", "mask"] | None = Field(
        None, description="What replaces a removed group; default: background rows (tabular), "
        "zeros (images), the mask token (text).")
    baseline_value: float = Field(0.0, description="The constant of baseline: constant.")
    groups: list[GroupConfig] | None = Field(None, description="Tabular blocks explained as one "
                                             "player each.")
    occlusion: OcclusionConfig | None = None
