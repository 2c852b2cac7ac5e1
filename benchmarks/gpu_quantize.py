"""GPU check: quantflow's quantization path and evaluator on CUDA.

Part 1 — the demo model: each scheme family quantized on CUDA and on the CPU of the same
machine (same recipe, same samples), perplexity of both on CUDA, and the CUDA/CPU time
ratio. Part 2 — a synthetic ~1B-parameter Llama (random weights: timing and memory only):
GPTQ W4A16 with llm-compressor's sequential onloading vs the whole model on the GPU
(peak GPU memory ratio), and FP8-dynamic streaming (model_free_ptq) on CUDA.

Uses only quantflow modules that need no Prefect, so it runs in a bare CUDA image with
llm-compressor added:  python benchmarks/gpu_quantize.py --out results/
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from quantflow.config import QuantConfig
from quantflow.evaluation.loading import load_for_eval
from quantflow.evaluation.perplexity import perplexity
from quantflow.quantization.recipes import streaming_scheme
from quantflow.quantization.runner import quantize

DEMO = Path(".cache/demo")
FAMILIES = {"gptq-w4a16": {"method": "gptq"}, "awq-w4a16": {"method": "awq"},
            "w8a8-int8": {"method": "w8a8"}, "fp8-dynamic": {"method": "fp8", "fp8_scheme": "dynamic"}}


def calibration_ids(tokenizer, n: int, seq_len: int) -> torch.Tensor:
    text = "\n\n".join(json.loads(x)["text"] for x in (DEMO / "data/calibration.jsonl").read_text().splitlines())
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(0)
    starts = torch.randperm(len(ids) - seq_len, generator=gen)[:n]
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def heldout() -> str:
    return "\n\n".join(json.loads(x)["text"] for x in (DEMO / "data/heldout.jsonl").read_text().splitlines())


def ppl(model_dir, dtype="float32") -> float:
    model, tok = load_for_eval(model_dir, dtype, "cuda")
    value = perplexity(model, tok, [heldout()], window=128, batch_size=32).perplexity
    del model
    torch.cuda.empty_cache()
    return value


def timed_quantize(model_dir, q, ids, out, device):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    entry = quantize(Path(model_dir), q, ids if q.needs_calibration else None, out, device)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**20, entry


def cpu_quantize(name: str, out: Path) -> None:
    """Child-process mode: the same quantization with CUDA hidden (CUDA_VISIBLE_DEVICES="")."""
    from transformers import AutoTokenizer

    ids = calibration_ids(AutoTokenizer.from_pretrained(DEMO / "model"), 64, 128)
    q = QuantConfig.model_validate(FAMILIES[name])
    start = time.perf_counter()
    quantize(DEMO / "model", q, ids if q.needs_calibration else None, out, "cpu")
    print(json.dumps({"seconds": time.perf_counter() - start}))


def part1(work: Path, results: dict, save) -> None:
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    ids = calibration_ids(AutoTokenizer.from_pretrained(DEMO / "model"), 64, 128)
    results["demo_baseline_ppl_cuda"] = round(ppl(DEMO / "model"), 4)
    save()
    for name, spec in FAMILIES.items():
        q = QuantConfig.model_validate(spec)
        row: dict = {}
        try:
            secs, peak, entry = timed_quantize(DEMO / "model", q, ids, work / f"{name}-cuda", "cuda")
            row["cuda"] = {"seconds": round(secs, 2), "peak_gpu_mib": round(peak, 1), "entry": entry,
                           "ppl": round(ppl(work / f"{name}-cuda"), 4)}
        except Exception as err:  # noqa: BLE001 - report and continue with the next scheme
            row["cuda"] = {"error": f"{type(err).__name__}: {err}"[:400]}
        proc = subprocess.run([sys.executable, __file__, "--cpu-quantize", name, str(work / f"{name}-cpu")],
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                              text=True, timeout=300)
        if proc.returncode == 0:
            secs = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
            row["cpu"] = {"seconds": round(secs, 2), "ppl": round(ppl(work / f"{name}-cpu"), 4)}
        else:
            row["cpu"] = {"error": proc.stderr[-400:]}
        if "seconds" in row["cuda"] and "seconds" in row["cpu"]:
            row["cpu_over_cuda_time"] = round(row["cpu"]["seconds"] / row["cuda"]["seconds"], 2)
        results.setdefault("demo", {})[name] = row
        save()


def part2(work: Path, results: dict, save) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    big = work / "synthetic-1b"
    model.save_pretrained(big)
    AutoTokenizer.from_pretrained(DEMO / "model").save_pretrained(big)  # any tokenizer: ids are synthetic
    params = sum(p.numel() for p in model.parameters())
    del model
    results["synthetic"] = {"params": params}
    ids = torch.randint(0, 32000, (64, 512), generator=torch.Generator().manual_seed(0))
    for label, sequential in (("gptq_sequential_onloading", True), ("gptq_whole_model_on_gpu", False)):
        q = QuantConfig(method="gptq", sequential_onloading=sequential)
        try:
            secs, peak, _ = timed_quantize(big, q, ids, work / label, "cuda")
            results["synthetic"][label] = {"seconds": round(secs, 2), "peak_gpu_mib": round(peak, 1)}
        except Exception as err:  # noqa: BLE001
            results["synthetic"][label] = {"error": f"{type(err).__name__}: {err}"[:400]}
        save()
    s = results["synthetic"]
    if "peak_gpu_mib" in s.get("gptq_sequential_onloading", {}) and "peak_gpu_mib" in s.get("gptq_whole_model_on_gpu", {}):
        s["peak_memory_ratio_whole_over_sequential"] = round(
            s["gptq_whole_model_on_gpu"]["peak_gpu_mib"] / s["gptq_sequential_onloading"]["peak_gpu_mib"], 2)
    q = QuantConfig(method="fp8", fp8_scheme="dynamic")
    assert streaming_scheme(q) is not None
    try:
        secs, peak, entry = timed_quantize(big, q, None, work / "fp8", "cuda")
        s["fp8_dynamic_streaming"] = {"seconds": round(secs, 2), "peak_gpu_mib": round(peak, 1), "entry": entry}
    except Exception as err:  # noqa: BLE001
        s["fp8_dynamic_streaming"] = {"error": f"{type(err).__name__}: {err}"[:400]}
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--skip", choices=["part1", "part2"], action="append", default=[])
    parser.add_argument("--cpu-quantize", nargs=2, metavar=("SCHEME", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cpu_quantize:
        cpu_quantize(args.cpu_quantize[0], Path(args.cpu_quantize[1]))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    save = lambda: (args.out / "gpu_results.json").write_text(json.dumps(results, indent=2))  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="quantflow-gpu-"))
    try:
        if "part1" not in args.skip:
            part1(work, results, save)
        if "part2" not in args.skip:
            part2(work, results, save)
    finally:
        save()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
