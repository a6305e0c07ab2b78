"""Generate the Python code for `protos/sidelight/v1/*.proto` (the one way it is produced).

Usage: python protos/generate.py [--out DIR]   (default: beside the .proto files)
A test runs this into a temporary directory and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = Path("sidelight") / "v1"


def proto_files() -> list[str]:
    """The .proto files, relative to the include root, in a stable order."""
    protos = (PROTO_ROOT / PACKAGE_DIR).glob("*.proto")
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in protos)


def plugin(name: str) -> str:
    """Path of a protoc plugin installed beside this Python (mypy-protobuf)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return found


def generate(out: Path) -> None:
    """Run protoc with the Python, gRPC and mypy stub generators into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--plugin=protoc-gen-mypy={plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *proto_files(),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
