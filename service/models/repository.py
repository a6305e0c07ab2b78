"""The model repository: Triton's layout, `<repo>/<model>/<version>/model.onnx` plus an optional
`<repo>/<model>/explain.yaml`. A broken model is recorded with its reason and skipped; explain.yaml
is checked against the model it configures; an unusable background or drift-reference file is
left out with a note, never fatal."""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from explainers.base import Array
from explainers.errors import FailedPrecondition, NotFound, quoted
from explainers.trees.onnx_trees import ParsedTrees, UnsupportedTrees, parse_onnx_trees
from service.config import BackgroundConfig, ModelConfig, Settings
from service.models.graph import index_inputs
from service.models.inputs import TABULAR, Layout, Modality, infer_modality
from service.models.onnx_model import OIP_TO_NUMPY, OnnxModel
from service.models.stamps import ModelStamp, scan_model

log = logging.getLogger(__name__)
MAX_CONFIG_BYTES = 1 << 20  # a larger explain.yaml is refused unread
MAX_CONFIG_NODES = 100_000  # YAML nodes (scalars, lists, maps) one explain.yaml may hold
MAX_ERROR_CHARS = 400  # config and file errors are cut here: never echo a whole structure
FILE_FIXES = {"background": "started without it: fix the file, or upload a background with "
                            "PutBackground",
              "drift_reference": "drift is measured against the default background instead"}


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
    notes: tuple[str, ...] = ()  # what an operator should know: files left out, and why
    drift_rows: Array | None = None  # (rows, features) explain.yaml's drift_reference, if usable
    modality: Modality = TABULAR  # how the inputs are read
    vocabulary: tuple[str, ...] = ()  # token strings by id (text models with a vocabulary file)

    @property
    def sha256(self) -> str:
        return self.onnx.sha256

    @cached_property
    def config_sha256(self) -> str:
        """The explain.yaml in effect, hashed: what answers depend on besides the ONNX file and
        the background (a reload may change it under the same file)."""
        return hashlib.sha256(self.config.model_dump_json().encode()).hexdigest()

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
    """All versions of one model: the ready ones and why the others failed. A published entry
    is not changed: a reload publishes a new one (service/models/reload.py)."""

    name: str
    versions: dict[str, LoadedModel] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # version -> why its reload failed
    # (the version loaded before goes on serving)

    def newest(self) -> str | None:
        ready = sorted(self.versions, key=version_key)
        return ready[-1] if ready else None


def version_key(v: str) -> tuple[int, str]:
    return (int(v), "") if v.isdigit() else (-1, v)


class ModelRepository:
    """Models found under a directory, loaded at start-up; a reload swaps whole entries in
    (`publish`), so a reader that took an entry sees one consistent state of the model."""

    def __init__(self, entries: dict[str, ModelEntry],
                 stamps: dict[str, ModelStamp] | None = None) -> None:
        self.entries = entries
        self.stamps = stamps or {}  # model -> what its files looked like when loaded

    @staticmethod
    def load(root: Path, settings: Settings) -> ModelRepository:
        """Load every model under `root`; failures are logged and kept, never raised. Each
        directory is stamped before it is read, so a change made meanwhile is seen later."""
        if not root.is_dir():
            raise FailedPrecondition(f"models_dir: {root} is not a directory")
        entries, stamps = {}, {}
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            stamps[d.name] = scan_model(d) or ModelStamp((), ())
            entries[d.name] = _load_entry(d, settings)
        return ModelRepository(entries, stamps)

    def publish(self, name: str, entry: ModelEntry | None, stamp: ModelStamp | None) -> None:
        """Swap one model's entry in (None: the model is gone) by replacing the whole maps:
        calls that already hold a model version finish on it. One writer (the reloader)."""
        entries, stamps = dict(self.entries), dict(self.stamps)
        entries.pop(name, None)
        stamps.pop(name, None)
        if entry is not None and stamp is not None:
            entries[name], stamps[name] = entry, stamp
        self.entries, self.stamps = entries, stamps

    def get(self, name: str, version: str = "") -> LoadedModel:
        """A ready model version ("" = newest), or NOT_FOUND / FAILED_PRECONDITION saying why."""
        entries = self.entries
        entry = entries.get(name)
        if entry is None:
            raise NotFound(f"model: no model {quoted(name)}; known: "
                           f"{', '.join(sorted(entries))}")
        return pick(entry, version)

    def ready(self) -> list[LoadedModel]:
        return [m for e in self.entries.values() for m in e.versions.values()]

    def fail(self, name: str, version: str, reason: str) -> None:
        """Record a loaded version as failed: a check only the data plane can make (e.g. the
        configured method against its estimators). At start-up, before anyone reads it."""
        entry = self.entries[name]
        entry.versions.pop(version, None)
        entry.failures[version] = reason
        log.error("model %s version %s failed to load: %s", name, version, reason)


def pick(entry: ModelEntry, version: str = "") -> LoadedModel:
    """A ready version of the entry ("" = newest), or NOT_FOUND / FAILED_PRECONDITION."""
    name = entry.name
    version = version or entry.newest() or max(entry.failures, key=version_key, default="")
    if version in entry.failures:
        raise FailedPrecondition(f"model: {name!r} version {version} failed to load: "
                                 f"{entry.failures[version]}")
    if version not in entry.versions:
        raise NotFound(f"version: model {name!r} has no version {quoted(version)}")
    return entry.versions[version]


def _load_entry(directory: Path, settings: Settings) -> ModelEntry:
    entry = ModelEntry(directory.name)
    try:
        config = read_config(directory)
    except Exception as err:  # an unreadable config fails this model only
        entry.failures["*"] = str(err)
        log.error("model %s: %s", directory.name, err)
        return entry
    for vdir in sorted(p for p in directory.iterdir() if (p / "model.onnx").is_file()):
        try:
            entry.versions[vdir.name] = load_version(directory.name, vdir, config, settings)
        except Exception as err:  # a broken model must not stop the others
            entry.failures[vdir.name] = shorten(f"{type(err).__name__}: {err}")
            log.error("model %s version %s failed to load: %s", directory.name, vdir.name,
                      entry.failures[vdir.name])
    if not entry.versions and not entry.failures:
        entry.failures["*"] = "no <version>/model.onnx found"
    return entry


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader without aliases and with a node cap, so a config holds no more than its text
    spells out: a 300-byte alias bomb would otherwise expand to tens of millions of nodes."""

    def __init__(self, stream: str, name: str = "explain.yaml") -> None:
        super().__init__(stream)
        self.name, self.nodes = name, 0  # name: what error marks say the text came from

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        alias = self.check_event(yaml.AliasEvent)  # peeks: current_event is the next event
        self.nodes += 1
        if alias or self.nodes > MAX_CONFIG_NODES:
            problem = ("aliases (*name) are not supported in explain.yaml; write the value out"
                       if alias else f"more than {MAX_CONFIG_NODES} YAML nodes")
            raise yaml.composer.ComposerError(None, None, problem, self.current_event.start_mark)
        return super().compose_node(parent, index)


def read_config(directory: Path) -> ModelConfig:
    """explain.yaml parsed and validated, or the defaults when there is none."""
    path = directory / "explain.yaml"
    if not path.exists():
        return ModelConfig()
    try:
        return ModelConfig.model_validate(parse_yaml(path) or {})
    except ValidationError as err:
        raise FailedPrecondition(f"{path}: {validation_summary(err)}") from None
    except (yaml.YAMLError, OSError, ValueError) as err:
        raise FailedPrecondition(f"{path}: {shorten(str(err))}") from None


def parse_yaml(path: Path) -> object:
    """A YAML file of at most MAX_CONFIG_BYTES through the BoundedLoader."""
    with path.open("rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise FailedPrecondition(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    loader = BoundedLoader(raw.decode())
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def validation_summary(err: ValidationError) -> str:
    """The first few schema errors as `field: message`, without the offending values (pydantic
    would render them, however large)."""
    found = err.errors(include_url=False, include_context=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}"
             for e in found[:5]]
    more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
    return shorten("; ".join(parts) + more)


def shorten(text: str) -> str:
    """One line of at most MAX_ERROR_CHARS characters."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS] + " ..."


def load_version(name: str, vdir: Path, config: ModelConfig, settings: Settings) -> LoadedModel:
    """Open the session, check the config against it, read the files and time the model."""
    model = OnnxModel(vdir / "model.onnx", threads=settings.ort_threads)
    output = config.output or model.main_output()
    check_config(config, model, output)
    background, header, bg_note = optional_rows(name, "background", vdir.parent,
                                                config.background, model, config, settings)
    drift_rows, _, drift_note = optional_rows(name, "drift_reference", vdir.parent,
                                              config.drift_reference, model, config, settings)
    probe = background if background is not None else np.zeros((1, model.n_features))
    model.measure(probe, output)
    model.check_margins(probe)
    check_logit(config, model, output, probe)
    trees, why = read_trees(model)
    config = tree_default_scale(config, model, output, trees)
    names, names_note = feature_names(config, model, header)
    notes = tuple(n for n in (bg_note, drift_note, names_note) if n)
    return LoadedModel(name, vdir.name, model, config, names, output, background, trees, why,
                       notes, drift_rows, modality_of(config, model),
                       read_vocabulary(vdir.parent, config))


def modality_of(config: ModelConfig, model: OnnxModel) -> Modality:
    """The modality inferred from the graph (or configured), checked against the config."""
    layout = config.image.layout if config.image else None
    modality = infer_modality(model.inputs, index_inputs(model.proto), config.modality, layout)
    if config.image is not None and modality.kind != "image":
        raise FailedPrecondition(f"explain.yaml image: the model's inputs are read as "
                                 f"{modality.kind}, not an image (set modality: image)")
    if config.baseline == "mask" and (config.text is None or config.text.mask_token is None):
        raise FailedPrecondition("explain.yaml baseline: mask needs text.mask_token")
    if config.baseline == "blur" and modality.kind != "image":
        raise FailedPrecondition("explain.yaml baseline: blur needs an image input")
    return modality


def read_vocabulary(directory: Path, config: ModelConfig) -> tuple[str, ...]:
    """text.vocabulary: one token per line, the line number being its id (bounded in size)."""
    name = config.text.vocabulary if config.text else None
    if not name:
        return ()
    path = directory / name
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise FailedPrecondition(f"explain.yaml text.vocabulary: {name} is over "
                                 f"{MAX_CONFIG_BYTES} bytes")
    return tuple(path.read_text(encoding="utf-8").splitlines())


def check_config(config: ModelConfig, model: OnnxModel, output: str) -> None:
    """explain.yaml against the model: the output exists, classes and class_names fit its
    columns, and a margin scale has a post_transform to remove. FAILED_PRECONDITION if not."""
    if output not in {o.name for o in model.outputs}:
        known = ", ".join(o.name for o in model.outputs)
        raise FailedPrecondition(f"explain.yaml output: model has no output {output!r}; "
                                 f"outputs: {known}")
    columns = model.output_columns(output)
    bad = [c for c in config.classes or () if not 0 <= c < columns]
    if bad:
        raise FailedPrecondition(f"explain.yaml classes: {bad} out of range; output {output!r} "
                                 f"has {columns} column(s)")
    if config.class_names is not None and len(config.class_names) != columns:
        raise FailedPrecondition(f"explain.yaml class_names: {len(config.class_names)} names "
                                 f"for the {columns} column(s) of output {output!r}")
    if config.scale == "margin" and output not in model.margin_outputs:
        raise FailedPrecondition(f"explain.yaml scale: margin, but output {output!r} has no "
                                 "link (post_transform, Sigmoid or Softmax) to remove; use "
                                 "identity or logit")


def check_logit(config: ModelConfig, model: OnnxModel, output: str, probe: Array) -> None:
    """`scale: logit` needs probabilities: the configured columns in [0, 1] on the probe rows
    (the background, else zeros), unless the logit is read off the margin."""
    if config.scale != "logit" or output in model.logit_is_margin:
        return
    p = model.predict(probe, output)  # (rows, columns)
    p = p[:, config.classes] if config.classes else p
    if np.any((p < 0) | (p > 1)):
        raise FailedPrecondition(f"explain.yaml scale: logit needs probabilities; output "
                                 f"{output!r} has values outside [0, 1]")


def tree_default_scale(config: ModelConfig, model: OnnxModel, output: str,
                       trees: ParsedTrees | None) -> ModelConfig:
    """A tree classifier without a configured scale is explained where TreeSHAP is exact (in
    milliseconds, where probabilities need a sampler and seconds): the logit of a LOGISTIC
    output, read off the margin, else the margin. An explicit `scale:` always wins (margin
    only where the model has one: check_config)."""
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


def feature_names(config: ModelConfig, model: OnnxModel,
                  header: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str]:
    """Configured names, else a CSV background's header, else generated ones (the input name,
    or input_j for wide inputs); and a note when the header disagrees with explain.yaml."""
    if config.features is not None:
        if len(config.features) != model.n_features:
            raise FailedPrecondition(f"explain.yaml features: {len(config.features)} names for "
                                     f"{model.n_features} model features")
        differ = header and header != tuple(config.features)
        return tuple(config.features), ("the background file's header differs from "
                                        "explain.yaml's features; using explain.yaml's"
                                        if differ else "")
    if header:
        return header, ""
    return tuple(i.name if i.columns == 1 else f"{i.name}_{j}"
                 for i in model.inputs for j in range(i.columns)), ""


def optional_rows(name: str, kind: str, directory: Path, spec: BackgroundConfig | None,
                  model: OnnxModel, config: ModelConfig,
                  settings: Settings) -> tuple[Array | None, tuple[str, ...], str]:
    """A file named in explain.yaml (`kind` is its key), with its header names; an unusable one
    is left out with a logged note saying what to do."""
    if spec is None:
        return None, (), ""
    try:
        data, names = read_rows(directory / spec.path, spec, model, config.allow_missing,
                                settings)
    except Exception as err:  # whatever is wrong with the file, the model starts without it
        why = str(err) if isinstance(err, FailedPrecondition) else f"{type(err).__name__}: {err}"
        note = f"{kind} file {spec.path} unusable ({shorten(why)}); {FILE_FIXES[kind]}"
        log.error("model %s: %s", name, note)
        return None, (), note
    return data, names, ""


def read_rows(path: Path, spec: BackgroundConfig, model: OnnxModel, allow_missing: bool,
              settings: Settings) -> tuple[Array, tuple[str, ...]]:
    """A .npy or .csv matrix checked against the model and capped at max_rows: (rows,
    features) float64 and a CSV header's names."""
    data, names = read_matrix(path)
    data = flat_rows(data, model)  # (rows, elements)
    limit = min(spec.max_rows or settings.max_background_rows, settings.max_background_rows)
    if data.shape[0] > limit:
        log.warning("%s: %d rows, keeping the first %d (max_rows)", path, data.shape[0], limit)
    data = np.array(data[:limit], dtype=np.float64)  # (rows, features), off the memory map
    why = unusable_values(model, data, allow_missing)
    if why:
        raise FailedPrecondition(why)
    return data, names


def flat_rows(data: Array, model: OnnxModel) -> Array:
    """Rows of a file as (rows, elements): flat already, or one input's shape per row
    ((rows, C, H, W) images, say), which also fixes the model's symbolic axes."""
    d = model.n_features
    if data.ndim == 2 and data.shape[1] == d and data.shape[0] > 0:
        return data
    layout = Layout.of_rows(model.inputs, data.shape[1:]) if data.ndim >= 2 else None
    if layout is None or data.shape[0] == 0 or (model.static and layout.elements != d):
        shape = ["rows", *model.layout.shapes[0]] if len(model.inputs) == 1 else ["rows", d]
        raise FailedPrecondition(f"shape {list(data.shape)}, the model needs {shape}")
    if not model.static:
        model.adopt_layout(layout)
    return data.reshape(data.shape[0], -1)


def read_matrix(path: Path) -> tuple[Array, tuple[str, ...]]:
    """A .npy file (memory-mapped, never unpickled) or a comma-separated file whose first row
    may be a header (any field that is not a number makes it one); the header's names."""
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False), ()
    with path.open(newline="") as f:
        first = next(csv.reader(f), [])
    header = tuple(v.strip() for v in first) if not all(map(_is_number, first)) else ()
    data = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1 if header else 0)
    if header and data.shape[1] != len(header):
        raise FailedPrecondition(f"the header has {len(header)} names for {data.shape[1]} "
                                 "columns")
    return data, header


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def unusable_values(model: OnnxModel, data: Array, allow_missing: bool) -> str:
    """Why rows (rows, features) cannot be fed to the model, "" if they can: a value its input's
    dtype cannot hold (infinite once cast, so 1e39 fails float32; NaN unless allow_missing, and
    never in an integer input)."""
    offsets = model.layout.offsets
    for k, spec in enumerate(model.inputs):
        dtype = np.dtype(OIP_TO_NUMPY[spec.datatype])
        cols = np.asarray(data[:, offsets[k]:offsets[k + 1]], np.float64)
        bad = _outside(cols, dtype, allow_missing)  # (rows, columns of this input)
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            hint = " (NaN needs `allow_missing: true` in explain.yaml)" \
                if np.isnan(cols[row, col]) and dtype.kind == "f" else ""
            return (f"row {row}, feature {col + offsets[k]}: {cols[row, col]:g} is "
                    f"not usable as the model's {dtype.name} input {spec.name!r}{hint}")
    return ""


def _outside(cols: Array, dtype: np.dtype[Any], allow_missing: bool) -> Array:
    """(rows, columns) mask of the values `dtype` cannot hold."""
    nan = np.isnan(cols)
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            cast = cols.astype(dtype)
        return np.asarray(np.isinf(cast) | (nan & (not allow_missing)))
    if dtype.kind == "b":
        return np.asarray(np.isinf(cols) | nan)
    info = np.iinfo(dtype)
    return np.asarray(nan | (cols < info.min) | (cols > info.max))
