"""Run the benchmark sections and write their results into docs/benchmarks.md.

Usage: python -m benchmarks.run [--quick] [--only SECTION ...]

Each section is a module `benchmarks.<name>` with `run(quick: bool) -> str` returning Markdown.
Sections are written between markers, so `--only` replaces its own sections and keeps the others;
each section is stamped with the command, date and machine that produced it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import sys
import time
from pathlib import Path

SECTIONS = ("shapley", "overhead", "calibration", "trees", "trees_deep", "store",
            "metrics_overhead", "memory", "fuzz", "load", "gradients", "captum", "batch", "groups",
            "global_views",
            "heldout_accuracy",
            "admission")
OPTIONAL = {"captum": "the `captum` extra (torch, captum)"}  # sections skipped without it
DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Produced by `make bench` (`python -m benchmarks.run`); each section says the exact command, date
and machine that made it. Speed is always compared side by side in one process (ratios), because
shared machines are noisy; absolute times are for orientation only.
"""


def machine() -> str:
    """One line about where the figures come from."""
    import numpy
    import onnxruntime
    import shap

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"shap {shap.__version__}")


def stamp(argv: list[str]) -> str:
    command = " ".join(["python -m benchmarks.run", *argv]).strip()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"_`{command}` on {when}; {machine()}._\n"


def replace_section(doc: str, name: str, body: str) -> str:
    """Put `body` between the markers of section `name`, appending the section if it is new."""
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: block, doc)
    return f"{doc.rstrip()}\n\n{block}\n"


def ordered(doc: str) -> str:
    """Sections in SECTIONS order after the header, whatever order they were written in."""
    blocks = {n: re.search(rf"<!-- section:{n} -->.*?<!-- /section:{n} -->", doc, re.S)
              for n in SECTIONS}
    parts = [HEADER.rstrip()] + [b.group(0) for b in blocks.values() if b]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(args_list)
    doc = DOC.read_text() if DOC.exists() else HEADER
    for name in args.only:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            section = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            if name not in OPTIONAL:
                raise
            print(f"skipped ({exc}): needs {OPTIONAL[name]}; its figures are kept", flush=True)
            continue
        body = section.run(args.quick)
        print(body, flush=True)
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
        doc = replace_section(doc, name, f"{body.rstrip()}\n\n{stamp(args_list)}")
        DOC.write_text(ordered(doc))


if __name__ == "__main__":
    main()
