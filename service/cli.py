"""`sidelight serve` runs the sidecar; `sidelight explain`, `sidelight models` and `sidelight
global ...` (service/client/global_commands.py) call one.

The client commands import the client (gRPC, numpy, the stubs: a fraction of a second; plus
matplotlib for --plot/--report and pyarrow for parquet files); `serve` imports the server stack
(onnx, onnxruntime, shap: seconds) when it runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from google.protobuf.json_format import MessageToDict

from service.client import batch, inputs, terminal
from service.client.batch import CHUNK_ROWS, CONCURRENCY
from service.client.client import CallError, Client, Options
from service.client.explanation import Explanation
from service.client.global_commands import add_commands as add_global_commands
from sidelight.v1 import explainer_pb2 as pb

if TYPE_CHECKING:
    from service.api.server import Sidelight
    from service.config import Settings
    from service.models.repository import LoadedModel

EXPLAIN_HELP = """Explain rows of a table, images or texts with a running server.

  sidelight explain --model diabetes_linear --row=0.03,0.05,0.06,0.02,-0.04,-0.03,-0.04,0,0.02,-0.01
  sidelight explain --model text_sentiment --text "not bad" --plot words.png
  sidelight explain --model digits_cnn --first 2 --grid 4 --report digits.html \\
      --input examples/models/digits_cnn/background.npy
  sidelight explain --model breast_cancer_gbdt --input rows.csv --out results.parquet

Files are sent in chunks of --chunk-rows rows, --concurrency at a time, with progress on
stderr; a chunk that fails after retries is reported and left out (exit status 1)."""


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
    explain = sub.add_parser("explain", help="explain rows, images or texts with a running "
                             "server", description=EXPLAIN_HELP,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    explain.add_argument("--model", required=True)
    rows = explain.add_mutually_exclusive_group(required=True)
    rows.add_argument("--row", action="append",
                      help="comma-separated feature values; repeat for more rows")
    rows.add_argument("--input", type=Path, help="a file of rows: .npy (batch axis first, "
                      "shaped like the model's input), .csv or .parquet (a column per feature)")
    explain.add_argument("--first", type=int, help="only the first N rows of --input")
    rows.add_argument("--text", action="append", help="a text for a text model (words of its "
                      "vocabulary; an unknown word is an error); repeat for more")
    explain.add_argument("--method", default="", help="auto, exact, permutation, kernel, tree, "
                         "linear, partition, occlusion, lime, ... (default: the model's)")
    explain.add_argument("--budget-ms", type=float, default=0.0,
                         help="latency budget per request (per chunk of --chunk-rows rows)")
    explain.add_argument("--seed", type=int, default=0)
    explain.add_argument("--target-error", type=float, default=0.0)
    explain.add_argument("--classes", default="", help="comma-separated output columns")
    explain.add_argument("--background", default="", help="named background ('' = default)")
    explain.add_argument("--grid", help="images: patches per axis, e.g. 4 or 4,2")
    explain.add_argument("--patch", help="images: patch size in pixels, e.g. 2 or 2,4")
    explain.add_argument("--baseline", help="what replaces a removed group: zeros, mean, "
                         "background, mask (text), blur[:SIGMA], constant:VALUE")
    explain.add_argument("--out", type=Path, help="write every row's attributions, standard "
                         "errors, base value and prediction: .parquet, .csv or .npy")
    explain.add_argument("--plot", type=Path, help="write a PNG (needs matplotlib)")
    explain.add_argument("--report", type=Path, help="write a self-contained HTML report")
    explain.add_argument("--chunk-rows", type=int, default=CHUNK_ROWS,
                         help=f"rows per request (default {CHUNK_ROWS})")
    explain.add_argument("--concurrency", type=int, default=CONCURRENCY,
                         help=f"requests in flight (default {CONCURRENCY})")
    explain.add_argument("--json", action="store_true", help="print the response as JSON")
    connection_options(explain)
    explain.add_argument("--timeout", type=float, help="seconds to wait for each request "
                         "(default none; a deadline also sets the budget when --budget-ms is 0)")
    explain.set_defaults(run=run_explain)
    models = sub.add_parser("models", help="list the models of a running server")
    connection_options(models)
    models.set_defaults(run=run_models)
    layers = sub.add_parser("layers", help="list a model's tensors, attention layers and "
                            "Grad-CAM layer (--weights: its weight statistics)")
    layers.add_argument("--model", required=True)
    layers.add_argument("--weights", action="store_true", help="weight statistics instead")
    connection_options(layers)
    layers.set_defaults(run=run_layers)
    add_global_commands(sub, connection_options, client_of)
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


def client_of(args: argparse.Namespace, timeout: float | None = None) -> Client:
    """A client for --address with the connection options."""
    if (args.tls_cert is None) != (args.tls_key is None):
        sys.exit("--tls-cert and --tls-key go together")
    ca, cert, key = (None if f is None else read_pem(f)
                     for f in (args.tls_ca, args.tls_cert, args.tls_key))
    return Client(args.address, timeout=timeout, tls=args.tls, root_certificates=ca,
                  certificate_chain=cert, private_key=key, token=args.token)


def read_pem(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        sys.exit(f"{path}: {err.strerror}")


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
    stopped = threading.Event()  # handlers first: a SIGTERM during start-up drains too
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    try:
        app = start(settings)
    except (StartupError, SidelightError) as err:  # a port in use, no repository: one line
        sys.exit(f"sidelight: {err}")
    print(banner(app), flush=True)
    while not stopped.wait(0.2):  # a blocked wait may never see a signal that the kernel
        pass  # delivered to another thread (grpc's): the handler runs only between bytecodes
    app.drain(settings.shutdown_grace_seconds, settings.shutdown_drain_seconds)


def banner(app: Sidelight) -> str:
    """What is being served and a one-line example call."""
    plane = app.data_plane()
    ready = plane.repo.ready()
    lines = [f"sidelight: serving {len(ready)} model version(s) on {app.settings.host}:{app.port}"
             f" ({metrics_where(app.metrics_port)})"]
    example = next((m for m in ready if m.background is not None), None)
    if example is not None and example.background is not None:
        row = ",".join(f"{v:.6g}" for v in example.background[0])
        lines.append(f"try: {command()} explain --address localhost:{app.port} --model "
                     f"{shlex.quote(example.name)} --row={row}")
    image = next((m for m in ready if m.modality.kind == "image" and image_file(app, m)), None)
    if image is not None:
        lines.append(f"try: {command()} explain --address localhost:{app.port} --model "
                     f"{shlex.quote(image.name)} --input {image_file(app, image)} --first 2 "
                     f"--grid 4 --report {shlex.quote(image.name + '.html')}")
    text = next((m for m in ready if m.vocabulary), None)
    if text is not None:
        words = shlex.quote(" ".join(example_words(text)))
        lines.append(f"try: {command()} explain --address localhost:{app.port} --model "
                     f"{shlex.quote(text.name)} --text {words}")
    needs = client_needs(app.settings)
    if needs:
        lines.append(f"clients need: {', '.join(needs)}")
    return "\n".join(lines)


def image_file(app: Sidelight, model: LoadedModel) -> str:
    """explain.yaml's background of an image model, when it is a .npy file (its rows are
    images), as a path to paste here; "" otherwise."""
    config = model.config.background
    if config is None or not config.path.endswith(".npy"):
        return ""
    path = Path(app.settings.models_dir) / model.name / config.path
    return pasteable(path.resolve()) if path.exists() else ""


def metrics_where(port: int) -> str:
    return f"metrics on :{port}/metrics" if port >= 0 else "metrics off"


def example_words(model: LoadedModel, count: int = 3) -> list[str]:
    """The first words of a text model's vocabulary that are neither padding nor the mask."""
    special = {model.config.text.pad_token, model.config.text.mask_token} if model.config.text \
        else set()
    return [w for i, w in enumerate(model.vocabulary) if i not in special][:count]


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


def run_explain(args: argparse.Namespace) -> None:
    """One request, or a batch in chunks when the rows need several or --out is given."""
    options = options_of(args)
    with client_of(args, args.timeout) as client:
        try:
            source = rows_of(args, client.model(args.model))
            if args.json:
                print_json(client, args, source, options)
                return
            result = explain_rows(client, args, source, options)
        except CallError as err:
            sys.exit(str(err))
        except (ValueError, ImportError, OSError) as err:
            sys.exit(f"sidelight: {err}")
    show(args, result)


def rows_of(args: argparse.Namespace, info: pb.ModelInfo) -> batch.Source:
    """The rows to explain: --row values split across the model's inputs, --text tokenized,
    or --input read chunk by chunk."""
    if args.input is not None:
        source = batch.open_source(args.input, info)
        return source if args.first is None else batch.Head(source, max(args.first, 0))
    if args.text:
        return batch.Prepared(inputs.prepare(info, args.text))
    try:
        values = np.array([[float(v) for v in r.split(",")] for r in args.row])  # (rows, feats)
        return batch.Prepared(inputs.from_array(info, values))
    except ValueError as err:
        sys.exit(f"--row: {err}")


def options_of(args: argparse.Namespace) -> Options:
    classes = [int(c) for c in args.classes.split(",") if c.strip()]
    return Options(method=args.method, budget_ms=args.budget_ms, seed=args.seed,
                   target_error=args.target_error, classes=tuple(classes),
                   background=args.background,
                   groups=inputs.groups(grid=sizes(args.grid, "--grid"),
                                        patch=sizes(args.patch, "--patch")),
                   baseline=baseline_of(args.baseline))


def sizes(text: str | None, flag: str) -> list[int] | None:
    try:
        return None if text is None else [int(v) for v in text.split(",")]
    except ValueError:
        sys.exit(f"{flag}: {text!r}: one or two whole numbers, e.g. 4 or 4,2")


def baseline_of(text: str | None) -> pb.Baseline | None:
    """--baseline KIND[:NUMBER]: the number is blur's sigma or the constant's value."""
    if not text:
        return None
    kind, _, number = text.partition(":")
    try:
        value = float(number) if number else 0.0
    except ValueError:
        sys.exit(f"--baseline: {text!r}: KIND or KIND:NUMBER, e.g. blur:2 or constant:0.5")
    return inputs.baseline(kind, value=value if kind == "constant" else 0.0,
                           sigma=value if kind == "blur" else 0.0)


def print_json(client: Client, args: argparse.Namespace, source: batch.Source,
               options: Options) -> None:
    """The one response as JSON (the rows must fit one request)."""
    chunks = list(islice(source.chunks(args.chunk_rows), 2))
    if len(chunks) != 1 or args.out or args.plot or args.report:
        sys.exit(f"--json prints one response: at most --chunk-rows ({args.chunk_rows}) rows "
                 "and no --out, --plot or --report")
    response = client.explain_response(args.model, chunks[0], options)
    print(json.dumps(MessageToDict(response), indent=2))


def explain_rows(client: Client, args: argparse.Namespace, source: batch.Source,
                 options: Options) -> batch.Result:
    """Every row, in chunks; progress on stderr for files, the answer kept unless only
    written to --out."""
    if source.ignored:
        print(f"sidelight: ignoring columns {', '.join(source.ignored)}", file=sys.stderr)
    sink = batch.open_sink(args.out) if args.out else None
    progress = batch.Progress(source.rows) if args.input is not None else None
    keep = args.plot is not None or args.report is not None or args.out is None
    result = batch.run(client, args.model, source, options, sink, chunk_rows=args.chunk_rows,
                       concurrency=args.concurrency, progress=progress, keep=keep,
                       timeout=args.timeout)
    if result.rows == 0 and result.failures:
        sys.exit(f"sidelight: no row was explained; {result.failures[0]}")
    return result


def show(args: argparse.Namespace, result: batch.Result) -> None:
    """Print, plot and report what was kept; say what was written; exit 1 after failures."""
    e = result.explanation
    if e is not None and args.out is None:
        classes = [int(c) for c in args.classes.split(",") if c.strip()]
        print(terminal.render(e, outputs=range(len(e.output_names)) if classes else None))
    if e is not None and (args.plot or args.report):
        write_pictures(args, e)
    if args.out is not None:
        print(f"wrote {result.rows:,} rows to {args.out} in {result.seconds:.1f} s "
              f"({result.rows / max(result.seconds, 1e-9):,.0f} rows/s)")
    if result.failures:
        sys.exit(f"sidelight: {len(result.failures)} chunk(s) failed; first: "
                 f"{result.failures[0]}")


def write_pictures(args: argparse.Namespace, e: Explanation) -> None:
    try:
        from service.client import plots, report
    except ImportError as err:
        sys.exit(f"--plot and --report need matplotlib ({err.name} is missing): "
                 "pip install 'sidelight[plots]'")
    if args.plot:
        plots.save(plots.summary(e), args.plot)
        print(f"wrote {args.plot}")
    if args.report:
        report.explanation_report(e).save(args.report)
        print(f"wrote {args.report}")


def run_models(args: argparse.Namespace) -> None:
    with client_of(args) as client:
        try:
            models = client.models()
        except CallError as err:
            sys.exit(str(err))
    for m in models:
        detail = m.error or f"{len(m.feature_names)} features, output {m.output}"
        print(f"{m.name} v{m.version} {m.state}: {detail}")



def run_layers(args: argparse.Namespace) -> None:
    """One line per tensor (name, op, shape at batch 1, datatype), or per weight."""
    with client_of(args) as client:
        try:
            lines = weight_lines(client, args.model) if args.weights else \
                layer_lines(client, args.model)
        except CallError as err:
            sys.exit(str(err))
    print("\n".join(lines))


def layer_lines(client: Client, model: str) -> list[str]:
    found = client.list_layers(model)
    lines = [f"{x.name}  {x.op_type}  {list(x.shape) if x.shape is not None else '?'}  "
             f"{x.datatype or '?'}" for x in found.layers]
    lines += [f"attention: {a.probabilities} ({a.kind} {a.node})" for a in found.attention]
    return [*lines, *([found.attention_unavailable] if found.attention_unavailable else []),
            f"gradcam layer: {found.gradcam_layer or 'none'}"]


def weight_lines(client: Client, model: str) -> list[str]:
    return [f"{w.name}  {list(w.shape)} {w.datatype}  mean {w.mean:.4g}  std {w.std:.4g}  "
            f"|max| {w.abs_max:.4g}  zeros {w.zeros:.1%}" for w in client.weights(model)]


if __name__ == "__main__":
    main()
