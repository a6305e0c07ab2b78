"""The `sidelight` command when things go wrong, and its banner: one clean line and a non-zero
exit instead of a traceback; the example call it prints runs as printed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.api.server import Sidelight
from service.cli import main
from tests.conftest import MODELS, ROOT

SCRIPT = Path(sys.executable).parent / "sidelight"  # the console script `pip install` made


def dead_address() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def one_line(exit_info: pytest.ExceptionInfo[SystemExit]) -> str:
    message = str(exit_info.value.code)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_calls_to_a_dead_address_fail_with_one_line() -> None:
    address = dead_address()
    with pytest.raises(SystemExit) as info:
        main(["models", "--address", address])
    assert one_line(info).startswith("UNAVAILABLE: ")
    with pytest.raises(SystemExit) as info:
        main(["explain", "--address", address, "--model", "diabetes_linear", "--row", "1"])
    assert one_line(info).startswith("UNAVAILABLE: ")


def test_serve_without_a_repository_fails_with_one_line() -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--models", "/nonexistent", "--port", "0", "--metrics-port", "-1"])
    assert one_line(info) == "sidelight: models_dir: /nonexistent is not a directory"


@pytest.mark.timeout(60)  # before the fix the second server started and served forever
def test_serve_on_ports_in_use_fails_with_one_line(app: Sidelight) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--models", str(MODELS), "--port", str(app.port), "--metrics-port", "-1"])
    assert one_line(info).startswith(f"sidelight: gRPC port {app.port} on 127.0.0.1 is in use")
    with pytest.raises(SystemExit) as info:
        main(["serve", "--models", str(MODELS), "--port", "0",
              "--metrics-port", str(app.metrics_port)])
    assert one_line(info).startswith(f"sidelight: metrics port {app.metrics_port} on 127.0.0.1")


def _env() -> dict[str, str]:
    """This checkout's code, and a PATH without the virtualenv: `make serve` does not activate
    it, so the banner must print a command that runs without."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and Path(p).resolve() != SCRIPT.parent.resolve()]
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'protos'}",
            "PATH": os.pathsep.join(path)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tuple[str, ...], int]]:
    """`sidelight serve` as `make serve` runs it, on free ports: (its example call, port)."""
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is not installed")
    repo = tmp_path_factory.mktemp("repo")
    for name in ("diabetes_linear", "digits_cnn", "text_sentiment"):
        shutil.copytree(MODELS / name, repo / name)
    log = (tmp_path_factory.mktemp("log") / "serve.log").open("w")
    proc = subprocess.Popen([SCRIPT, "serve", "--models", repo, "--port", "0",
                             "--metrics-port", "0"], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=log)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]  # serving, a table, an image, a text
        assert all(t.startswith("try: ") for t in lines[1:]), (lines, Path(log.name).read_text())
        port = int(lines[0].split(" on ")[1].split(" ")[0].rsplit(":", 1)[1])
        yield tuple(t.removeprefix("try: ").strip() for t in lines[1:]), port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_the_banners_examples_run_as_printed(served: tuple[tuple[str, ...], int],
                                             tmp_path: Path) -> None:
    (table, image, text), _ = served
    done = subprocess.run(table, shell=True, cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, (table, done.stderr)
    assert done.stdout.startswith("diabetes_linear v1: linear")
    done = subprocess.run(text, shell=True, cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, (text, done.stderr)
    assert done.stdout.startswith("text_sentiment v1: exact"), done.stdout
    assert "not" in done.stdout and "good" in done.stdout  # the words, attributed
    report = tmp_path / "digits.html"  # not into the checkout
    image = image.replace("--report digits_cnn.html", f"--report {report}")
    done = subprocess.run(image, shell=True, cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, (image, done.stderr)
    assert "\nrow 1 " in done.stdout and "\nrow 2 " not in done.stdout  # --first 2 of 100
    assert report.stat().st_size > 10_000


def test_explain_into_a_closed_pipe_prints_no_traceback(
        served: tuple[tuple[str, ...], int]) -> None:
    """`sidelight explain ... | head -1` where head has already gone."""
    _, port = served
    proc = subprocess.Popen(
        [SCRIPT, "explain", "--address", f"127.0.0.1:{port}", "--model", "diabetes_linear",
         "--row=" + ",".join(["0.01"] * 10)], cwd=ROOT, env=_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader leaves before the answer is printed
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
