"""The model repository: Triton's layout, `<repo>/<model>/<version>/model.onnx` plus an optional
`<repo>/<model>/explain.yaml`. A broken model is recorded with its reason and skipped."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from explainers.base import Array
from explainers.errors import FailedPrecondition, NotFound, SidelightError
from explainers.trees.onnx_trees import ParsedTrees, UnsupportedTrees, parse_onnx_trees
from service.config import ModelConfig, Settings
from service.models.onnx_model import OnnxModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """One ready model version with everything the data plane needs to explain it."""

    name: str
    version: str
    onnx: OnnxModel
    config: ModelConfig
    feature_names: tuple[str, ...]
    output: str
    background: Array | None  # (rows, features) from explain.yaml's file, if any
    trees: ParsedTrees | None = None  # the tree ensemble read from the graph, if TreeSHAP can
    tree_error: str = "no tree ensemble"  # why not, when trees is None

    @property
    def sha256(self) -> str:
        return self.onnx.sha256

    def column_names(self, output: str) -> list[str]:
        """Names of the columns of an output: class names, ZipMap labels or output[j]."""
        n = self.onnx.output_columns(output)
        if output == self.output and self.config.class_names and len(self.config.class_names) == n:
            return list(self.config.class_names)
        labels = self.onnx.class_labels.get(output)
        if labels and len(labels) == n:
            return labels
        return [output] if n == 1 else [f"{output}[{j}]" for j in range(n)]


@dataclass
class ModelEntry:
    """All versions of one model: the ready ones and why the others failed."""

    name: str
    versions: dict[str, LoadedModel] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    def newest(self) -> str | None:
        ready = sorted(self.versions, key=_version_key)
        return ready[-1] if ready else None


def _version_key(v: str) -> tuple[int, str]:
    return (int(v), "") if v.isdigit() else (-1, v)


class ModelRepository:
    """Models found under a directory, loaded once at start-up."""

    def __init__(self, entries: dict[str, ModelEntry]) -> None:
        self.entries = entries

    @staticmethod
    def load(root: Path, settings: Settings) -> ModelRepository:
        """Load every model under `root`; failures are logged and kept, never raised."""
        if not root.is_dir():
            raise FailedPrecondition(f"models_dir: {root} is not a directory")
        entries = {d.name: _load_entry(d, settings) for d in sorted(root.iterdir()) if d.is_dir()}
        return ModelRepository(entries)

    def get(self, name: str, version: str = "") -> LoadedModel:
        """A ready model version ("" = newest), or NOT_FOUND / FAILED_PRECONDITION saying why."""
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"model: no model {name!r}; known: {', '.join(sorted(self.entries))}")
        version = version or entry.newest() or max(entry.failures, key=_version_key, default="")
        if version in entry.failures:
            raise FailedPrecondition(f"model: {name!r} version {version} failed to load: "
                                     f"{entry.failures[version]}")
        if version not in entry.versions:
            raise NotFound(f"version: model {name!r} has no version {version!r}")
        return entry.versions[version]

    def ready(self) -> list[LoadedModel]:
        return [m for e in self.entries.values() for m in e.versions.values()]


def _load_entry(directory: Path, settings: Settings) -> ModelEntry:
    entry = ModelEntry(directory.name)
    try:
        config = read_config(directory)
    except SidelightError as err:
        entry.failures["*"] = str(err)
        log.error("model %s: %s", directory.name, err)
        return entry
    for vdir in sorted(p for p in directory.iterdir() if (p / "model.onnx").is_file()):
        try:
            entry.versions[vdir.name] = load_version(directory.name, vdir, config, settings)
        except Exception as err:  # a broken model must not stop the others
            entry.failures[vdir.name] = f"{type(err).__name__}: {err}"
            log.error("model %s version %s failed to load: %s", directory.name, vdir.name, err)
    if not entry.versions and not entry.failures:
        entry.failures["*"] = "no <version>/model.onnx found"
    return entry


def read_config(directory: Path) -> ModelConfig:
    """explain.yaml parsed and validated, or the defaults when there is none."""
    path = directory / "explain.yaml"
    if not path.exists():
        return ModelConfig()
    try:
        return ModelConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as err:
        raise FailedPrecondition(f"{path}: {err}".replace("\n", "; ")) from err


def load_version(name: str, vdir: Path, config: ModelConfig, settings: Settings) -> LoadedModel:
    """Open the session, check the config against it, read the background and time the model."""
    model = OnnxModel(vdir / "model.onnx", threads=settings.ort_threads)
    output = config.output or model.main_output()
    model.output_info(output)
    background = read_background(vdir.parent, config, model.n_features, settings)
    probe = background if background is not None else np.zeros((1, model.n_features))
    model.measure(probe, output)
    model.check_margins(probe)
    trees, why = read_trees(model)
    config = tree_default_scale(config, model, output, trees)
    return LoadedModel(name, vdir.name, model, config, feature_names(config, model), output,
                       background, trees, why)


def tree_default_scale(config: ModelConfig, model: OnnxModel, output: str,
                       trees: ParsedTrees | None) -> ModelConfig:
    """A tree classifier without a configured scale is explained where TreeSHAP is exact (in
    milliseconds, where probabilities need a sampler and seconds): the logit of a LOGISTIC
    output, read off the margin, else the margin. An explicit `scale:` always wins (margin
    only where the model has one)."""
    if config.scale == "margin" and output not in model.margin_outputs:
        raise FailedPrecondition(f"explain.yaml scale: margin, but output {output!r} has no "
                                 "link (post_transform, Sigmoid or Softmax) to remove")
    if "scale" in config.model_fields_set or trees is None \
            or output not in trees["score_outputs"] or output not in model.margin_outputs:
        return config
    scale = "logit" if output in model.logit_is_margin else "margin"
    return config.model_copy(update={"scale": scale})


def read_trees(model: OnnxModel) -> tuple[ParsedTrees | None, str]:
    """The graph's tree ensemble in shap's format, or None and the reason it cannot be used."""
    try:
        parsed = parse_onnx_trees(model.proto)
    except UnsupportedTrees as err:
        return None, str(err)
    except Exception as err:  # a graph the parser did not foresee: fall back, never fail load
        log.warning("tree parser failed on %s: %s: %s", model.sha256[:12], type(err).__name__,
                    err)
        return None, f"the tree parser failed ({type(err).__name__})"
    if parsed["n_features"] != model.n_features:
        return None, f"the trees read {parsed['n_features']} of {model.n_features} features"
    return parsed, ""


def feature_names(config: ModelConfig, model: OnnxModel) -> tuple[str, ...]:
    """Configured names, or generated ones: the input name, or input_j for wide inputs."""
    if config.features is not None:
        if len(config.features) != model.n_features:
            raise FailedPrecondition(f"explain.yaml features: {len(config.features)} names for "
                                     f"{model.n_features} model features")
        return tuple(config.features)
    names = [i.name if i.columns == 1 else f"{i.name}_{j}"
             for i in model.inputs for j in range(i.columns)]
    return tuple(names)


def read_background(directory: Path, config: ModelConfig, n_features: int,
                    settings: Settings) -> Array | None:
    """The background file named in explain.yaml (.npy or .csv), checked and capped."""
    if config.background is None:
        return None
    path = directory / config.background.path
    if path.suffix == ".npy":
        data = np.load(path, allow_pickle=False)
    else:
        data = np.loadtxt(path, delimiter=",", ndmin=2)
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != n_features or data.shape[0] == 0:
        raise FailedPrecondition(f"background {path}: shape {data.shape}, model needs "
                                 f"[rows, {n_features}]")
    limit = min(config.background.max_rows or settings.max_background_rows,
                settings.max_background_rows)
    if data.shape[0] > limit:
        log.warning("background %s: %d rows, keeping the first %d (max_rows)", path,
                    data.shape[0], limit)
    return data[:limit]
