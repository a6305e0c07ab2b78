"""`sidelight serve` runs the sidecar; `sidelight explain` and `sidelight models` call one.

The client commands import gRPC, numpy and the stubs only (a fraction of a second); `serve`
imports the server stack (onnx, onnxruntime, shap: seconds) when it runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from service.api.server import Sidelight
    from service.config import Settings

LOOKUP_TIMEOUT_S = 10.0  # ListModels and GetModel; Explain's deadline is --timeout only


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `sidelight` command."""
    args = parser().parse_args(argv)
    try:
        args.run(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `sidelight explain ... | head`: the reader has gone, so be quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sidelight", description=__doc__)
    sub = p.add_subparsers(required=True)
    serve = sub.add_parser("serve", help="serve a model repository")
    serve.add_argument("--models", type=Path, help="model repository (SIDELIGHT_MODELS_DIR)")
    serve.add_argument("--port", type=int, help="gRPC port (SIDELIGHT_PORT, default 50051)")
    serve.add_argument("--metrics-port", type=int, help="metrics port (default 9090, -1 off)")
    serve.set_defaults(run=run_serve)
    explain = sub.add_parser("explain", help="explain rows with a running server")
    explain.add_argument("--model", required=True)
    explain.add_argument("--row", action="append", required=True,
                         help="comma-separated feature values; repeat for more rows")
    explain.add_argument("--method", default="")
    explain.add_argument("--budget-ms", type=float, default=0.0)
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--target-error", type=float, default=0.0)
    explain.add_argument("--classes", default="", help="comma-separated output columns")
    explain.add_argument("--json", action="store_true", help="print the response as JSON")
    connection_options(explain)
    explain.add_argument("--timeout", type=float, help="seconds to wait for the explanation "
                         "(default none; a deadline also sets the budget when --budget-ms is 0)")
    explain.set_defaults(run=run_explain)
    models = sub.add_parser("models", help="list the models of a running server")
    connection_options(models)
    models.set_defaults(run=run_models)
    return p


def connection_options(p: argparse.ArgumentParser) -> None:
    """Where the server is and how to reach it: TLS, mutual TLS, a bearer token."""
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--tls", action="store_true", help="connect with TLS (implied by the next "
                   "three; without --tls-ca the system's CAs verify the server)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) that signs the server's")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM), for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="the client certificate's private key (PEM)")
    p.add_argument("--token", default=os.environ.get("SIDELIGHT_TOKEN"),
                   help="bearer token (default: $SIDELIGHT_TOKEN, which keeps it out of `ps`)")


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to --address: plaintext, or TLS when any --tls option is given."""
    files = (args.tls_ca, args.tls_key, args.tls_cert)
    if not args.tls and all(f is None for f in files):
        return grpc.insecure_channel(args.address)
    if (args.tls_cert is None) != (args.tls_key is None):
        sys.exit("--tls-cert and --tls-key go together")
    ca, key, cert = (None if f is None else read_pem(f) for f in files)
    return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(ca, key, cert))


def read_pem(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        sys.exit(f"{path}: {err.strerror}")


def credentials(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying --token, if any."""
    return (("authorization", f"Bearer {args.token}"),) if args.token else ()


def run_serve(args: argparse.Namespace) -> None:
    """Build the settings once (flags override SIDELIGHT_* variables) and serve until killed."""
    try:
        from explainers.errors import SidelightError
        from service.api.server import StartupError, start
        from service.config import Settings
    except ImportError as err:  # the base install is the client
        sys.exit(f"sidelight serve needs the server extras ({err.name} is missing): "
                 "pip install 'sidelight[server]'")

    flags = {"models_dir": args.models, "port": args.port, "metrics_port": args.metrics_port}
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = start(settings)
    except (StartupError, SidelightError) as err:  # a port in use, no repository: one line
        sys.exit(f"sidelight: {err}")
    print(banner(app), flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    while not stopped.wait(0.2):  # a blocked wait may never see a signal that the kernel
        pass  # delivered to another thread (grpc's): the handler runs only between bytecodes
    app.drain(settings.shutdown_grace_seconds, settings.shutdown_drain_seconds)


def banner(app: Sidelight) -> str:
    """What is being served and a one-line example call."""
    plane = app.data_plane()
    ready = plane.repo.ready()
    lines = [f"sidelight: serving {len(ready)} model version(s) on {app.settings.host}:{app.port}"
             f" (metrics on :{app.metrics_port}/metrics)"]
    example = next((m for m in ready if m.background is not None), None)
    if example is not None and example.background is not None:
        row = ",".join(f"{v:.6g}" for v in example.background[0])
        lines.append(f"try: {command()} explain --address localhost:{app.port} --model "
                     f"{shlex.quote(example.name)} --row={row}")
    needs = client_needs(app.settings)
    if needs:
        lines.append(f"clients need: {', '.join(needs)}")
    return "\n".join(lines)


def client_needs(s: Settings) -> list[str]:
    """What a client must add to the example call under these security settings."""
    return [need for on, need in (
        (s.tls_cert is not None, "--tls-ca <the CA that signs SIDELIGHT_TLS_CERT>"),
        (s.tls_client_ca is not None, "--tls-cert and --tls-key <a client certificate>"),
        (s.tokens_path is not None, "SIDELIGHT_TOKEN=<a token> (or --token)")) if on]


def command() -> str:
    """This `sidelight` as it can be pasted here: the running script's path (relative when it
    is under the working directory; it need not be on PATH), or `python -m service.cli`."""
    script = Path(os.path.abspath(sys.argv[0])) if sys.argv[0] else None
    if script is None or script.suffix == ".py" or not os.access(script, os.X_OK):
        return f"{pasteable(Path(sys.executable))} -m service.cli"
    return pasteable(script)


def pasteable(path: Path) -> str:
    """`path` for a shell in the working directory: relative below it, else absolute."""
    try:
        relative = str(path.relative_to(Path.cwd()))
    except ValueError:
        return shlex.quote(str(path))
    return shlex.quote(relative if "/" in relative else f"./{relative}")


def failed(err: grpc.RpcError) -> str:
    """A failed call as one line: `CODE: details`."""
    return f"{err.code().name}: {' '.join((err.details() or '').split())}"


def run_explain(args: argparse.Namespace) -> None:
    with open_channel(args) as channel:
        stub, token = pb_grpc.ExplainerStub(channel), credentials(args)
        try:
            info = stub.GetModel(pb.GetModelRequest(model=args.model), timeout=LOOKUP_TIMEOUT_S,
                                 metadata=token)
            response = stub.Explain(build_request(args, info), timeout=args.timeout,
                                    metadata=token)
        except grpc.RpcError as err:
            sys.exit(failed(err))
    print(json.dumps(MessageToDict(response), indent=2) if args.json else render(response))


def build_request(args: argparse.Namespace, info: pb.ModelInfo) -> pb.ExplainRequest:
    """Split each --row across the model's inputs by their column counts."""
    try:
        rows = np.array([[float(v) for v in r.split(",")] for r in args.row])  # (rows, feats)
    except ValueError as err:
        sys.exit(f"--row: {err}")
    widths = [s.shape[1] if len(s.shape) > 1 else 1 for s in info.inputs]
    if rows.shape[1] != sum(widths):
        sys.exit(f"--row: {rows.shape[1]} values; model {info.name} takes {sum(widths)}")
    edges = np.cumsum([0, *widths])
    inputs = [fp64_tensor(s.name, rows[:, a:b] if len(s.shape) > 1 else rows[:, a])
              for s, a, b in zip(info.inputs, edges[:-1], edges[1:], strict=True)]
    classes = [int(c) for c in args.classes.split(",") if c.strip()]
    return pb.ExplainRequest(model=args.model, inputs=inputs, method=args.method,
                             budget_ms=args.budget_ms, seed=args.seed,
                             target_error=args.target_error,
                             target=pb.Target(classes=classes))


def fp64_tensor(name: str, values: np.ndarray) -> pb.Tensor:
    """Values as an FP64 tensor (raw little-endian); the server casts to the input's type."""
    return pb.Tensor(name=name, datatype="FP64", shape=list(values.shape),
                     raw=np.ascontiguousarray(values, dtype="<f8").tobytes())


def render(r: pb.ExplainResponse) -> str:
    """A readable table per row and output, features by decreasing |attribution|."""
    c = r.cost
    out = [f"{r.model} v{r.version}: {r.method}, {c.model_evaluations} evaluations, "
           f"{c.elapsed_ms:.1f} ms of {c.budget_ms:.0f} ms ({c.budget_source}), "
           f"background {r.background} ({r.background_rows} rows), scale {r.scale}"]
    out.extend(f"note: {n}" for n in r.notes)
    d = len(r.feature_names)
    for i, row in enumerate(r.rows):
        for k, name in enumerate(r.output_names):
            phi = np.array(row.attributions[k * d:(k + 1) * d])
            se = np.array(row.std_errors[k * d:(k + 1) * d])
            out.append(f"row {i} · {name}: prediction {row.predictions[k]:.4g} = base "
                       f"{row.base_values[k]:.4g} + sum of attributions")
            out.extend(f"  {r.feature_names[j]:<28} {phi[j]:+.4g} ± {1.96 * se[j]:.2g}"
                       for j in np.argsort(-np.abs(phi)))
    return "\n".join(out)


def run_models(args: argparse.Namespace) -> None:
    with open_channel(args) as channel:
        try:
            response = pb_grpc.ExplainerStub(channel).ListModels(
                pb.ListModelsRequest(), timeout=LOOKUP_TIMEOUT_S, metadata=credentials(args))
        except grpc.RpcError as err:
            sys.exit(failed(err))
    for m in response.models:
        detail = m.error or f"{len(m.feature_names)} features, output {m.output}"
        print(f"{m.name} v{m.version} {m.state}: {detail}")


if __name__ == "__main__":
    main()
