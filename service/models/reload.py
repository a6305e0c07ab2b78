"""Reloading one model directory after its files changed: the versions to load again, loaded
into a new ModelEntry beside the published one. A version whose new files fail to load keeps
the one loaded before, and the reason is kept for GetModel. Nothing here is published: the
data plane warms the new versions first, then the repository swaps the entry in
(service/plane/reloader.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from service.config import ModelConfig, Settings
from service.models.repository import LoadedModel, ModelEntry, load_version, read_config, shorten
from service.models.stamps import ModelStamp

LOADED, FAILED, REMOVED = "loaded", "failed", "removed"
OUTCOMES = (LOADED, FAILED, REMOVED)
CONFIG = "*"  # the version key of what concerns every version: explain.yaml
NO_VERSIONS = "no <version>/model.onnx found"

T = TypeVar("T")
Check = Callable[[LoadedModel], str | None]  # the data plane's own check: why not, or None


@dataclass(frozen=True)
class Outcome:
    """What a reload did to one version (CONFIG: to the model's explain.yaml)."""

    version: str
    outcome: str  # LOADED, FAILED or REMOVED
    detail: str = ""  # the new file's sha256, or why it failed


@dataclass(frozen=True)
class Reload:
    """A model's entry after a reload, not yet published, and what changed."""

    name: str
    entry: ModelEntry | None  # None: the model directory is gone
    stamp: ModelStamp | None
    loaded: tuple[LoadedModel, ...]  # new version objects, to warm before the swap
    outcomes: tuple[Outcome, ...]


def reload_model(root: Path, name: str, stamp: ModelStamp | None, before: ModelStamp | None,
                 current: ModelEntry | None, settings: Settings, check: Check) -> Reload:
    """Load what changed in `root/name` since `before` (the stamp of `current`): every version
    when explain.yaml or a file beside it changed, else the new and replaced versions; removed
    versions are dropped."""
    gone = _versions_of(current) - (set() if stamp is None else set(stamp.version_stamps()))
    removed = tuple(Outcome(v, REMOVED) for v in sorted(gone))
    if stamp is None:
        return Reload(name, None, None, (), removed)
    entry = _carried(name, current, gone)
    todo = _to_load(stamp, before, current)
    try:
        config = read_config(root / name)
    except Exception as err:  # the versions loaded before keep their explain.yaml
        return Reload(name, _config_failed(entry, todo, str(err)), stamp, (),
                      (*removed, Outcome(CONFIG, FAILED, shorten(str(err)))))
    entry.failures.pop(CONFIG, None)
    loaded, outcomes = [], list(removed)
    for version in todo:
        outcome, model = _load_one(entry, root / name / version, config, settings, check)
        outcomes.append(outcome)
        loaded += [model] if model is not None else []
    if not entry.versions and not entry.failures:
        entry.failures[CONFIG] = NO_VERSIONS
    return Reload(name, entry, stamp, tuple(loaded), tuple(outcomes))


def _versions_of(entry: ModelEntry | None) -> set[str]:
    """The versions an entry knows of, ready or failed."""
    if entry is None:
        return set()
    return {*entry.versions, *entry.failures, *entry.rejected} - {CONFIG}


def _carried(name: str, current: ModelEntry | None, gone: Iterable[str]) -> ModelEntry:
    """A copy of the published entry without the removed versions (published entries are
    never changed)."""
    if current is None:
        return ModelEntry(name)
    drop = set(gone)
    return ModelEntry(name, _without(current.versions, drop), _without(current.failures, drop),
                      _without(current.rejected, drop))


def _without(table: dict[str, T], drop: set[str]) -> dict[str, T]:
    return {k: v for k, v in table.items() if k not in drop}


def _to_load(stamp: ModelStamp, before: ModelStamp | None,
             current: ModelEntry | None) -> list[str]:
    """Every version when the model is new, its configuration files changed or it had none
    usable; else the versions whose model.onnx is new or replaced."""
    versions = stamp.version_stamps()
    if current is None or before is None or before.files != stamp.files \
            or CONFIG in current.failures:
        return sorted(versions)
    old = before.version_stamps()
    return sorted(v for v, s in versions.items() if old.get(v) != s)


def _config_failed(entry: ModelEntry, todo: list[str], why: str) -> ModelEntry:
    """The entry when explain.yaml cannot be used: ready versions go on with the explain.yaml
    they were loaded with (GetModel's notes say so); others fail as at start-up."""
    if not entry.versions:
        return ModelEntry(entry.name, failures={CONFIG: why})
    for version in todo:
        if version in entry.versions:
            entry.rejected[version] = (f"reload: the changed explain.yaml cannot be used "
                                       f"({shorten(why)}); still serving with the one loaded "
                                       "before")
        else:
            entry.failures[version] = why
    return entry


def _load_one(entry: ModelEntry, vdir: Path, config: ModelConfig, settings: Settings,
              check: Check) -> tuple[Outcome, LoadedModel | None]:
    """Load one version into the entry; on failure keep what served it before, if anything."""
    version = vdir.name
    try:
        model = load_version(entry.name, vdir, config, settings)
        problem = check(model)
    except Exception as err:  # a broken file must not stop the other versions or models
        problem = shorten(f"{type(err).__name__}: {err}")
    if problem is None:
        entry.versions[version] = model
        entry.failures.pop(version, None)
        entry.rejected.pop(version, None)
        return Outcome(version, LOADED, model.sha256), model
    if version in entry.versions:
        old = entry.versions[version]
        entry.rejected[version] = (f"reload: the new files of version {version} failed to load "
                                   f"({problem}); still serving the file loaded before "
                                   f"(sha256 {old.sha256[:16]}...)")
    else:
        entry.failures[version] = problem
    return Outcome(version, FAILED, problem), None
