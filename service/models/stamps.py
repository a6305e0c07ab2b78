"""What the model repository looks like on disk, cheaply: the size, modification time and inode
of each file a model is loaded from. Comparing two looks tells which models changed without
reading a byte of them (a model file may be hundreds of megabytes; the repository is looked at
every few seconds)."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

FileStamp = tuple[int, int, int]  # (mtime_ns, size, inode): a replaced or rewritten file differs


@dataclass(frozen=True)
class ModelStamp:
    """One model directory: its own files (explain.yaml and the background, drift reference and
    vocabulary files beside it) and each version's model.onnx, both sorted by name."""

    files: tuple[tuple[str, FileStamp], ...]
    versions: tuple[tuple[str, FileStamp], ...]

    def version_stamps(self) -> dict[str, FileStamp]:
        return dict(self.versions)


def file_stamp(path: Path) -> FileStamp | None:
    """A regular file's stamp (symlinks followed: a Kubernetes volume swaps them), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def scan_model(directory: Path) -> ModelStamp | None:
    """The stamp of a model directory, None when it is gone. Version directories are those
    with a model.onnx, as the repository loads them; every other file beside them counts as
    configuration."""
    try:
        children = sorted(directory.iterdir())
    except OSError:
        return None
    files: list[tuple[str, FileStamp]] = []
    versions: list[tuple[str, FileStamp]] = []
    for child in children:
        is_dir = child.is_dir()
        stamp = file_stamp(child / "model.onnx" if is_dir else child)
        if stamp is not None:
            (versions if is_dir else files).append((child.name, stamp))
    return ModelStamp(tuple(files), tuple(versions))


def scan_repository(root: Path) -> dict[str, ModelStamp] | None:
    """Every model directory's stamp; None when the repository itself cannot be read (an
    unmounted volume must not look like every model removed)."""
    try:
        directories = sorted(d for d in root.iterdir() if d.is_dir())
    except OSError:
        return None
    found = {d.name: scan_model(d) for d in directories}
    return {name: stamp for name, stamp in found.items() if stamp is not None}


def settled(loaded: Mapping[str, ModelStamp], before: Mapping[str, ModelStamp],
            now: Mapping[str, ModelStamp]) -> list[str]:
    """Models whose files differ from what is loaded and did not change since the look
    before: a file still being copied is not loaded half-written."""
    names = sorted({*loaded, *now})
    return [n for n in names if now.get(n) == before.get(n) and now.get(n) != loaded.get(n)]
