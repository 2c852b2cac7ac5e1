"""The quality table: every method on the demo model — perplexity change, checkpoint size,
quantize time — from one command:

    make quality-table     (python -m quantflow.demo.quality_table --out docs/quality-table.md)

Same baseline, same 64 x 128 calibration samples, same held-out text and evaluator for
every row. NVFP4/MXFP4 checkpoints only run in bfloat16, so their rows compare against a
bfloat16 baseline.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from quantflow.config import CalibrationConfig, ModelSpec, QuantConfig, ValidationConfig
from quantflow.demo.assets import DEFAULT_DIR, build_demo_assets
from quantflow.evaluation.loading import load_for_eval
from quantflow.evaluation.perplexity import perplexity
from quantflow.evaluation.suite import heldout_text
from quantflow.tasks.calibration import build_calibration
from quantflow.tasks.checkpoint import prepare_checkpoint
from quantflow.tasks.quantize import quantize_model

# AWQ is asymmetric (AutoAWQ's zero_point default), so it is paired with asymmetric RTN.
ROWS = [
    {"method": "rtn", "bits": 4, "group_size": 128}, {"method": "gptq", "bits": 4, "group_size": 128},
    {"method": "rtn", "bits": 4, "group_size": 128, "sym": False},
    {"method": "awq", "bits": 4, "group_size": 128},
    {"method": "rtn", "bits": 3, "group_size": 64}, {"method": "gptq", "bits": 3, "group_size": 64},
    {"method": "rtn", "bits": 3, "group_size": 64, "sym": False},
    {"method": "awq", "bits": 3, "group_size": 64},
    {"method": "rtn", "bits": 2, "group_size": 64}, {"method": "gptq", "bits": 2, "group_size": 64},
    {"method": "rtn", "bits": 2, "group_size": -1},
    {"method": "w8a16"}, {"method": "w8a8"},
    {"method": "fp8", "fp8_scheme": "dynamic"}, {"method": "fp8", "fp8_scheme": "static"},
    {"method": "fp8", "fp8_scheme": "block"},
    {"method": "nvfp4"}, {"method": "mxfp4"},
]
BF16_ONLY = {"nvfp4", "mxfp4"}


def measure_ppl(model_dir, validation: ValidationConfig, text: str, dtype: str) -> float:
    model, tok = load_for_eval(model_dir, dtype, "cpu")
    p = validation.perplexity
    return perplexity(model, tok, [text], window=p.window, batch_size=p.batch_size).perplexity


def build_table(root: Path, work: Path) -> list[dict]:
    validation = ValidationConfig.model_validate({
        "perplexity": {"source": {"dataset": str(root / "data" / "heldout.jsonl")}, "window": 128},
        "consistency": {"enabled": False}})
    ckpt = prepare_checkpoint(ModelSpec(id=str(root / "model")), validation, str(work))
    cal = build_calibration(CalibrationConfig.model_validate({
        "source": {"dataset": str(root / "data" / "calibration.jsonl")}, "num_samples": 64,
        "seq_len": 128}), ckpt, str(work))
    text = heldout_text(validation, "table")
    base = {"float32": measure_ppl(root / "model", validation, text, "float32"),
            "bfloat16": measure_ppl(root / "model", validation, text, "bfloat16")}
    rows = []
    for i, spec in enumerate(ROWS):
        q = QuantConfig.model_validate(spec)
        start = time.perf_counter()
        m = quantize_model(q, ckpt, cal if q.needs_calibration else None, str(work / f"q{i}"))
        seconds = time.perf_counter() - start
        dtype = "bfloat16" if q.method in BF16_ONLY else "float32"
        ppl = measure_ppl(m.uri, validation, text, dtype)
        rows.append({"scheme": q.label, "entry_point": m.entry_point, "eval_dtype": dtype,
                     "baseline_ppl": base[dtype], "ppl": ppl, "delta_pct": 100 * (ppl - base[dtype]) / base[dtype],
                     "size_mb": m.size_bytes / 1e6, "baseline_mb": m.baseline_size_bytes / 1e6,
                     "quantize_s": seconds})
        logging.info("%-24s ppl %.3f (%+.2f%%) %.2f MB %.1fs", q.label, ppl, rows[-1]["delta_pct"],
                     rows[-1]["size_mb"], seconds)
    return rows


def render(rows: list[dict]) -> str:
    base_mb = rows[0]["baseline_mb"] if rows else 0.0
    lines = [f"| scheme | llm-compressor entry | perplexity (baseline) | Δ perplexity | size (baseline {base_mb:.2f} MB) | quantize time |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['entry_point']} | {r['ppl']:.3f} ({r['baseline_ppl']:.3f}"
                     f"{', bf16' if r['eval_dtype'] == 'bfloat16' else ''}) | {r['delta_pct']:+.2f}% | "
                     f"{r['size_mb']:.2f} MB | {r['quantize_s']:.1f} s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown table here (default: print)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("llmcompressor", "quantflow.quantize", "quantflow.calibration", "quantflow.evaluate",
                  "quantflow.checkpoint", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")
    root = build_demo_assets(Path(DEFAULT_DIR), log=lambda *_: None)
    with tempfile.TemporaryDirectory(prefix="quantflow-table-") as work:
        table = render(build_table(root, Path(work)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
