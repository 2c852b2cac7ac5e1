"""Architecture x scheme on this host: quantize, validate, serve (docs/models.md).

For the dense demo Llama and the Qwen3-MoE and Mixtral fixtures (quantflow/demo/fixtures.py),
every scheme quantflow offers is quantized by the quantize stage's own runner, measured by
validate's loader (which path measured it, perplexity against the baseline on the held-out
text), probed for serving by the architecture-aware probe, and, where it serves, served by
vLLM and measured again through its prompt log-probabilities on validate's token windows
(served fidelity). Prints a markdown table; `--json FILE` keeps the numbers.

    .venv/bin/python benchmarks/model_matrix.py [--family qwen3_moe ...] [--scheme w8a8 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEMES = {
    "gptq-w4a16": {"method": "gptq", "bits": 4, "group_size": 128},
    "gptq-w4a16-g64": {"method": "gptq", "bits": 4, "group_size": 64},
    "awq-w4a16-asym": {"method": "awq", "bits": 4, "group_size": 128},
    "rtn-w4a16": {"method": "rtn", "bits": 4, "group_size": 128},
    "w8a8-int8": {"method": "w8a8"},
    "fp8-dynamic": {"method": "fp8", "fp8_scheme": "dynamic"},
    "fp8-block": {"method": "fp8", "fp8_scheme": "block"},
    "w8a16": {"method": "w8a16"},
}


def main() -> int:
    from transformers import AutoTokenizer

    from quantflow.storage.checkpoints import read_config
    from quantflow.config import DeployConfig, QuantConfig
    from quantflow.demo.assets import DEFAULT_DIR, build_demo_assets
    from quantflow.demo.corpus import split_corpus
    from quantflow.demo.fixtures import build_fixture
    from quantflow.evaluation.fidelity import fidelity_windows, model_slice
    from quantflow.evaluation.loading import load_for_eval
    from quantflow.evaluation.perplexity import perplexity
    from quantflow.errors import StageError
    from quantflow.quantization.architecture import describe
    from quantflow.quantization.group_size import block_problem
    from quantflow.quantization.runner import quantize
    from quantflow.serving.compatibility import check_scheme
    from quantflow.serving.fidelity import served_slice
    from quantflow.serving.schemes import scheme_of_checkpoint
    from quantflow.serving.temporary import temporary_server
    from quantflow.tasks.quantize import with_architecture_ignores

    parser = argparse.ArgumentParser()
    parser.add_argument("--family", action="append", choices=["llama", "qwen3_moe", "mixtral"])
    parser.add_argument("--scheme", action="append", choices=list(SCHEMES))
    parser.add_argument("--json")
    args = parser.parse_args()
    demo = build_demo_assets(REPO / DEFAULT_DIR) / "model"
    models = {"llama": demo}
    for fam in ("qwen3_moe", "mixtral"):
        models[fam] = build_fixture(fam, demo, REPO / ".cache" / "fixtures")
    text = split_corpus()["heldout"][:20000]
    deploy = DeployConfig(dtype="bfloat16", max_model_len=256, cpu_kv_cache_gib=0.0625)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="quantflow-matrix-"))
    try:
        for fam in args.family or list(models):
            model = models[fam]
            config = read_config(model)
            base = load_for_eval(model, "float32", "cpu")
            base_ppl = perplexity(base.model, base.tokenizer, [text], window=128, batch_size=8).perplexity
            windows = fidelity_windows(base.tokenizer, text, 8, 128)
            tok = AutoTokenizer.from_pretrained(model)
            ids = torch.tensor(tok(split_corpus()["calibration"])["input_ids"][:64 * 128]).view(64, 128)
            for name in args.scheme or list(SCHEMES):
                row = {"family": fam, "architecture": describe(config), "scheme": name}
                q = with_architecture_ignores(QuantConfig.model_validate(SCHEMES[name]), config)
                block = block_problem(q, model)
                if block:  # the flow refuses it at flow start, from the checkpoint's shapes
                    row.update(serves=False, reason=f"refused at flow start: {block[0]}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                out = work / f"{fam}-{name}"
                start = time.perf_counter()
                try:
                    row["entry"] = quantize(model, q, ids if q.needs_calibration else None, out, "cpu")
                    row["quantize_s"] = round(time.perf_counter() - start, 1)
                except Exception as err:  # noqa: BLE001 - the matrix records it
                    row["quantize_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                try:
                    lm = load_for_eval(out, "float32", "cpu")
                    q_ppl = perplexity(lm.model, lm.tokenizer, [text], window=128, batch_size=8).perplexity
                    row.update(path=lm.path, fallback=bool(lm.fallback_from), baseline_ppl=round(base_ppl, 4),
                               ppl=round(q_ppl, 4), delta_pct=round(100 * (q_ppl - base_ppl) / base_ppl, 2))
                    validated = model_slice(lm.model, windows)
                except StageError as err:
                    row["validate_error"] = str(err).splitlines()[0][:300]
                    validated = None
                answer = check_scheme(scheme_of_checkpoint(str(out)), deploy, model_config=config)
                row.update(serves=answer["serves"], reason=answer["reason"])
                if answer["serves"] and validated is not None:
                    with temporary_server(str(out), deploy, 256) as ep:
                        served = served_slice(ep["base_url"], ep["served_model_name"], windows, None)
                    row.update(served_ppl=round(served["perplexity"], 4), validated_slice_ppl=round(validated["perplexity"], 4),
                               fidelity_delta_pct=round(100 * (served["perplexity"] - validated["perplexity"])
                                                        / validated["perplexity"], 2))
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print("\n" + table(rows))
    return 0


def table(rows: list[dict]) -> str:
    """The rows as docs/models.md's markdown table."""
    out = ["| architecture | scheme | quantize | validate: perplexity (path) | serves on this host | served vs validated |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if "quantize_s" in r:
            quant = f"{r['quantize_s']} s ({r['entry']})"
        else:
            quant = f"fails: {r['quantize_error']}" if "quantize_error" in r else "–"
        val = (f"{r['baseline_ppl']} → {r['ppl']} ({r['delta_pct']:+.2f}%; "
               f"{'per-expert' if r.get('fallback') else 'transformers'})" if "ppl" in r else r.get("validate_error", "–"))
        serve = "yes" if r.get("serves") else f"no: {r.get('reason', '–')}"
        fid = f"{r['served_ppl']} vs {r['validated_slice_ppl']} ({r['fidelity_delta_pct']:+.2f}%)" if "served_ppl" in r else "–"
        out.append(f"| {r['architecture']} | {r['scheme']} | {quant} | {val} | {serve} | {fid} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
