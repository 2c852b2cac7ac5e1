"""Benchmark: what a fresh Python process pays to import the stack, with the .pyc files
`make setup` writes (uv --compile-bytecode) against without them.

Every stage run on a Prefect worker, every vLLM server (its API process and its engine
process) and every CLI call is a fresh process. Where PYTHONDONTWRITEBYTECODE=1 is set (this
machine kind sets it), Python writes no .pyc of its own, so without compiled files each of
them compiles torch, transformers, llm-compressor and vLLM from source. "without" points
Python's bytecode cache at an empty folder (-X pycache_prefix), which is what an install
without --compile-bytecode gives on such a machine; "with" reads the installed __pycache__.

    .venv/bin/python benchmarks/import_cost.py [--repeat 3]

Prints each import's median wall time both ways and the ratio with / without.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [  # (label, interpreter, statement): what a worker's stage run and a vLLM server import
    ("pipeline flow + transformers", REPO / ".venv" / "bin" / "python",
     "import quantflow.flows.pipeline; from transformers import AutoModelForCausalLM"),
    ("llm-compressor oneshot", REPO / ".venv" / "bin" / "python", "from llmcompressor import oneshot"),
    ("vLLM OpenAI API server", REPO / ".venv-serve" / "bin" / "python", "import vllm.entrypoints.openai.api_server"),
]


def timed(python: Path, statement: str, prefix: str | None) -> float:
    args = [str(python)] + (["-X", f"pycache_prefix={prefix}"] if prefix else []) + ["-c", statement]
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'import':32} {'without .pyc':>13} {'with .pyc':>10} {'with / without':>15}")
    for label, python, statement in CASES:
        if not python.exists():
            print(f"{label:32} skipped: {python} missing (make setup)")
            continue
        with tempfile.TemporaryDirectory() as empty:
            without = statistics.median(timed(python, statement, empty) for _ in range(args.repeat))
        with_pyc = statistics.median(timed(python, statement, None) for _ in range(args.repeat))
        print(f"{label:32} {without:12.2f}s {with_pyc:9.2f}s {with_pyc / without:14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
