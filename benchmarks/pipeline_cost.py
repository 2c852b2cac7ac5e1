"""Benchmark: quantflow's own cost at real model sizes, as ratios measured side by side.

On checkpoints with Llama-3.2-1B and Llama-3.1-8B shapes and random weights
(shaped_checkpoints.py; built once into .cache/bench), in one run:

  P1  the quantize stage through the flow / a direct llm-compressor call on the same
      inputs (RTN and FP8 on the 1B shapes, GPTQ on the 1B shapes with 2 layers)
  P2  a rerun of stages 1-4 / the first run
  P3  FP8-dynamic streaming of the 8B shapes / a plain copy of its files, and peak RSS
  P4  quantflow's perplexity evaluator vs lm-eval's rolling log-likelihood
  P5  peak RSS while quantizing / checkpoint size, calibrated and streaming paths
  P6  the demo end to end on this machine (installs excluded)
  S1  stage 1 at size: hashing speed / plain read speed, baseline evaluation time and memory

Pipelines run as a user runs them (`quantflow run --no-deploy`, embedded Prefect server),
in a private state, cache and Prefect home, so the first run computes everything. Each
direct call runs in its own process, so its peak memory is its own.

    make benchmark   (or: .venv/bin/python benchmarks/pipeline_cost.py [--skip-8b])

Results: benchmarks/results/cost-<isa>-<cores>core.json; docs/benchmarks.md shows them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shaped_checkpoints import BENCH_DIR, build, checkpoint_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / ".cache" / "demo"
GIB = 2**30
GOALS = {"P1": 1.05, "P2": 0.05, "P3": 3.0, "P5": 1.5}
CUDA = "cuda"  # the --gpu rows' device (a dry run of them elsewhere sets "cpu")


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- child processes

def _measured(fn) -> dict:
    from quantflow.profiling import measure

    with measure() as usage:
        extra = fn() or {}
    gpu = {"peak_gpu_gib": round(usage.peak_gpu_mib / 1024, 3)} if usage.peak_gpu_mib else {}
    return {"seconds": usage.wall_s, "peak_rss_gib": round(usage.peak_rss_mib / 1024, 3), **gpu, **extra}


def child_direct(model_dir: str, quant: dict, calibration: str | None, out: str, device: str = "cpu") -> dict:
    """llm-compressor called directly: what the quantize stage does, without quantflow.
    Importing llm-compressor is inside the measured time on both sides: the stage imports
    it when it starts (quantflow imports it nowhere earlier)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantflow.config import QuantConfig
    from quantflow.quantization.recipes import recipe_yaml, streaming_scheme
    from quantflow.quantization.runner import STREAMING_EXTRA_IGNORE, calibration_dataset

    q = QuantConfig.model_validate(quant)
    scheme = streaming_scheme(q)
    ids = torch.load(calibration)["input_ids"] if calibration else None

    def streaming() -> None:
        from llmcompressor import model_free_ptq

        model_free_ptq(model_dir, out, scheme=scheme, ignore=list(q.ignore) + STREAMING_EXTRA_IGNORE,
                       device=device, max_workers=min(4, os.cpu_count() or 1))

    def calibrated() -> None:
        from llmcompressor import oneshot

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        kwargs = {}
        if ids is not None and q.needs_calibration:
            kwargs = dict(dataset=calibration_dataset(ids), num_calibration_samples=len(ids),
                          max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
        oneshot(model=model, tokenizer=tokenizer, recipe=recipe_yaml(q), **kwargs)
        model.save_pretrained(out, save_compressed=True)
        tokenizer.save_pretrained(out)

    return _measured(streaming if scheme is not None else calibrated)


def child_quantflow(model_dir: str, quant: dict, calibration: str | None, out: str, device: str = "cpu") -> dict:
    """quantflow's quantization step (runner.quantize, what the stage runs) on its own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - as child_direct

    from quantflow.config import QuantConfig
    from quantflow.quantization.runner import quantize

    q = QuantConfig.model_validate(quant)
    ids = torch.load(calibration)["input_ids"] if calibration else None
    return _measured(lambda: {"entry": quantize(Path(model_dir), q, ids, Path(out), device)})


def child_copy(model_dir: str, out: str) -> dict:
    def copy() -> None:
        Path(out).mkdir(parents=True)
        for f in sorted(Path(model_dir).iterdir()):
            if f.is_file():
                shutil.copyfile(f, Path(out) / f.name)
    return _measured(copy)


def child_read(model_dir: str, how: str) -> dict:
    """Every shard read once: plainly (the disk's speed) or through quantflow's sha256."""
    from quantflow.storage.hashing import CHUNK, file_sha256

    shards = sorted(Path(model_dir).glob("*.safetensors"))

    def read() -> dict:
        for s in shards:
            if how == "sha256":
                file_sha256(s)
            else:
                with open(s, "rb") as f:
                    while f.read(CHUNK):
                        pass
        return {"bytes": sum(s.stat().st_size for s in shards)}
    return _measured(read)


CHILDREN = {"direct": child_direct, "quantflow": child_quantflow,
            "copy": child_copy, "read": child_read}


def child(name: str, *args) -> dict:
    """Run CHILDREN[name] in a fresh process; its last stdout line is its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--child", name, json.dumps(args)],
                          capture_output=True, text=True, cwd=REPO, env=os.environ)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def warm_page_cache(folder: Path) -> None:
    """Both sides of a ratio read warm files: read everything once first."""
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 * 2**20):
                pass


# ---------------------------------------------------------------- pipeline runs

def pipeline_config(name: str, model: Path, out: Path, quant: dict) -> dict:
    return {
        "name": name, "output_dir": str(out), "model": {"id": str(model)},
        "calibration": {"source": {"dataset": str(DEMO / "data" / "calibration.jsonl")},
                        "num_samples": 16, "seq_len": 128},
        "quant": quant,
        # Random weights: every perplexity is near the vocabulary size, so the thresholds
        # only keep the verdict from depending on noise; the cost is what is measured.
        "validation": {"perplexity": {"source": {"dataset": str(DEMO / "data" / "heldout.jsonl")},
                                      "window": 128, "max_tokens": 512, "max_increase_pct": 100},
                       "consistency": {"prompts": ["The for statement"], "max_new_tokens": 4,
                                       "kl_tokens": 256, "max_kl": 10.0},
                       "lm_eval": {"enabled": False}},
        "deploy": {"enabled": False},
    }


def quantflow_cli(*args: str) -> tuple[int, float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "quantflow.cli", *args], capture_output=True,
                          text=True, cwd=REPO, env=os.environ)
    return proc.returncode, time.perf_counter() - start, proc.stdout[-2000:] + proc.stderr[-3000:]


def run_pipeline(work: Path, cfg: dict) -> dict:
    path = work / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, wall, tail = quantflow_cli("run", "--config", str(path), "--no-deploy")
    summary_path = Path(cfg["output_dir"]) / "pipeline_summary.json"
    if rc not in (0, 2) or not summary_path.exists():
        raise RuntimeError(f"quantflow run {cfg['name']} exited {rc}:\n{tail}")
    summary = json.loads(summary_path.read_text())
    summary["process_wall_s"] = round(wall, 2)
    return summary


def stage(summary: dict, name: str) -> dict:
    return summary["stages"][name]


# ---------------------------------------------------------------- the measurements

def ratio(a: float, b: float) -> float:
    return round(a / b, 3)


def flow_vs_direct(q: dict, direct: dict, size: int) -> tuple[dict, dict]:
    """(P1, P5) rows from a pipeline's quantize stage record and the direct call's result."""
    p1 = {"flow_s": q["wall_s"], "direct_s": direct["seconds"], "ratio": ratio(q["wall_s"], direct["seconds"])}
    p5 = {"flow_peak_rss_gib": round(q["peak_rss_mib"] / 1024, 3), "direct_peak_rss_gib": direct["peak_rss_gib"],
          "checkpoint_gib": round(size / GIB, 3), "ratio": ratio(q["peak_rss_mib"] * 2**20, size),
          "direct_ratio": ratio(direct["peak_rss_gib"] * GIB, size)}
    return p1, p5


def measure_1b(work: Path, ckpt: Path, results: dict) -> None:
    size = checkpoint_bytes(ckpt)
    out = work / "runs" / "1b"
    rtn = {"method": "rtn", "bits": 4, "group_size": 128}
    warm_page_cache(ckpt)

    log("S1  stage 1 at size: sha256 vs a plain read of the 1B shards")
    plain = child("read", str(ckpt), "plain")
    hashed = child("read", str(ckpt), "sha256")
    results["S1"] = {"bytes": plain["bytes"],
                     "read_mb_s": round(plain["bytes"] / plain["seconds"] / 1e6, 1),
                     "sha256_mb_s": round(hashed["bytes"] / hashed["seconds"] / 1e6, 1),
                     "sha256_peak_rss_gib": hashed["peak_rss_gib"],
                     "sha256_time_over_read": ratio(hashed["seconds"], plain["seconds"])}

    log("P2  the 1B pipeline (RTN W4A16), first run and rerun")
    first = run_pipeline(work, pipeline_config("bench-1b", ckpt, out, rtn))
    again = run_pipeline(work, pipeline_config("bench-1b", ckpt, out, rtn))
    ck = stage(first, "checkpoint")
    results["S1"].update(stage1_s=ck["wall_s"], stage1_peak_rss_gib=round(ck["peak_rss_mib"] / 1024, 3),
                         stage1_peak_rss_over_size=ratio(ck["peak_rss_mib"] * 2**20, size))
    results["P2"] = {"first_s": first["wall_s_excluding_deploy"], "rerun_s": again["wall_s_excluding_deploy"],
                     "ratio": ratio(again["wall_s_excluding_deploy"], first["wall_s_excluding_deploy"]),
                     "rerun_cache_hits": again["cache_hits"],
                     "process_first_s": first["process_wall_s"], "process_rerun_s": again["process_wall_s"],
                     "process_ratio": ratio(again["process_wall_s"], first["process_wall_s"]),
                     "stages_first": {s: r["wall_s"] for s, r in first["stages"].items()}}

    log("P1  RTN W4A16 on the 1B shapes: direct llm-compressor call")
    direct = child("direct", str(ckpt), rtn, None, str(work / "direct-rtn"))  # data-free
    results["P1_rtn"], results["P5_rtn_streaming"] = flow_vs_direct(stage(first, "quantize"), direct, size)
    results["P5_validate"] = {"peak_rss_gib": round(stage(first, "validate")["peak_rss_mib"] / 1024, 3),
                              "ratio": ratio(stage(first, "validate")["peak_rss_mib"] * 2**20, size)}
    shutil.rmtree(work / "direct-rtn", ignore_errors=True)

    log("P1  FP8-dynamic (streaming) on the 1B shapes: flow, then direct")
    fp8 = {"method": "fp8", "fp8_scheme": "dynamic"}
    run = run_pipeline(work, pipeline_config("bench-1b", ckpt, out, fp8))
    direct = child("direct", str(ckpt), fp8, None, str(work / "direct-fp8"))
    results["P1_fp8"], _ = flow_vs_direct(stage(run, "quantize"), direct, size)
    shutil.rmtree(work / "direct-fp8", ignore_errors=True)


def measure_gptq(work: Path, ckpt: Path, results: dict) -> None:
    log("P1  GPTQ W4A16 on the 1B shapes with 2 layers: flow, then direct")
    size = checkpoint_bytes(ckpt)
    out = work / "runs" / "1b-2layers"
    gptq = {"method": "gptq", "bits": 4, "group_size": 128}
    warm_page_cache(ckpt)
    run = run_pipeline(work, pipeline_config("bench-1b-2layers", ckpt, out, gptq))
    direct = child("direct", str(ckpt), gptq, str(out / "calibration_data.pt"), str(work / "direct-gptq"))
    results["P1_gptq"], results["P5_gptq_sequential"] = flow_vs_direct(stage(run, "quantize"), direct, size)
    shutil.rmtree(work / "direct-gptq", ignore_errors=True)


def measure_8b(work: Path, ckpt: Path, results: dict) -> None:
    log("P3  FP8-dynamic streaming of the 8B shapes vs a plain copy")
    size = checkpoint_bytes(ckpt)
    copy = child("copy", str(ckpt), str(work / "copy-8b"))
    shutil.rmtree(work / "copy-8b", ignore_errors=True)
    fp8 = child("quantflow", str(ckpt), {"method": "fp8", "fp8_scheme": "dynamic"}, None, str(work / "fp8-8b"))
    out_bytes = checkpoint_bytes(work / "fp8-8b")
    shutil.rmtree(work / "fp8-8b", ignore_errors=True)
    results["P3"] = {"checkpoint_gib": round(size / GIB, 2), "copy_s": copy["seconds"], "fp8_s": fp8["seconds"],
                     "ratio": ratio(fp8["seconds"], copy["seconds"]), "fp8_gib": round(out_bytes / GIB, 2),
                     "copy_peak_rss_gib": copy["peak_rss_gib"], "fp8_peak_rss_gib": fp8["peak_rss_gib"]}
    results["P5_streaming_8b"] = {"peak_rss_gib": fp8["peak_rss_gib"], "checkpoint_gib": round(size / GIB, 2),
                                  "ratio": ratio(fp8["peak_rss_gib"] * GIB, size)}


def measure_perplexity(results: dict) -> None:
    log("P4  perplexity evaluator vs lm-eval (demo model)")
    from perplexity_vs_lmeval import compare

    results["P4"] = compare()


def measure_demo(work: Path, results: dict) -> None:
    log("P6  the demo end to end (quantflow demo: stages 1-4, deploy on vLLM, first monitoring)")
    from quantflow.serving.registry import DeploymentRegistry

    out = work / "runs" / "demo"
    rc, wall, tail = quantflow_cli("demo", "--name", "bench-demo", "--output-dir", str(out))
    try:
        if rc != 0:
            raise RuntimeError(f"quantflow demo exited {rc}:\n{tail}")
        summary = json.loads((out / "pipeline_summary.json").read_text())
    finally:  # the demo leaves its server and metrics exporter running; the benchmark does not
        from quantflow.monitoring.exporter_process import stop_exporter

        DeploymentRegistry().stop_all()
        stop_exporter()
    results["P6"] = {"process_s": round(wall, 1), "pipeline_s": summary["total_wall_s"],
                     "excluding_deploy_s": summary["wall_s_excluding_deploy"], "method": summary["method"],
                     "stages": {s: r["wall_s"] for s, r in summary["stages"].items()}}


def measure_gpu(work: Path, tokenizer: Path, results: dict, skip_8b: bool = False) -> None:
    """--gpu: P1, P3 and P5 on CUDA, with GPU peak memory. It needs no Prefect (a bare CUDA
    image with llm-compressor's wheels added runs it), so P1 there compares quantflow's quantization step
    (runner.quantize: what the stage runs, without the task around it) with the direct
    llm-compressor call; the flow's own overhead is the CPU rows' P1."""
    import torch

    def pair(key: str, ckpt: Path, quant: dict, calibration: str | None) -> None:
        size = checkpoint_bytes(ckpt)

        def once(which: str) -> dict:
            result = child(which, str(ckpt), quant, calibration, str(work / f"{key}-{which}"), CUDA)
            shutil.rmtree(work / f"{key}-{which}", ignore_errors=True)
            return result

        # The first process to run a scheme pays one-time costs (kernel and bytecode caches,
        # first reads): measured once and left out, so neither side gets them.
        warmup = once("direct")
        ours, direct = once("quantflow"), once("direct")
        results[key] = {"quantflow_s": ours["seconds"], "direct_s": direct["seconds"], "warmup_s": warmup["seconds"],
                        "ratio": ratio(ours["seconds"], direct["seconds"]),
                        "peak_rss_gib": ours["peak_rss_gib"], "peak_gpu_gib": ours.get("peak_gpu_gib"),
                        "direct_peak_gpu_gib": direct.get("peak_gpu_gib"), "direct_peak_rss_gib": direct["peak_rss_gib"],
                        "checkpoint_gib": round(size / GIB, 3),
                        "rss_ratio": ratio(ours["peak_rss_gib"] * GIB, size)}
        log(f"    {key}: {json.dumps(results[key])}")

    one_b = build("llama-3.2-1b", tokenizer, log=log)
    calibration = work / "calibration.pt"
    ids = torch.randint(0, 500, (64, 512), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids}, calibration)
    log("P1/P5 (CUDA)  GPTQ W4A16, 1B, 64 x 512 calibration tokens, sequential onloading")
    pair("cuda_gptq_1b", one_b, {"method": "gptq", "bits": 4, "group_size": 128, "device": CUDA}, str(calibration))
    log("P1/P5 (CUDA)  FP8-dynamic streaming, 1B")
    pair("cuda_fp8_1b", one_b, {"method": "fp8", "fp8_scheme": "dynamic", "device": CUDA}, None)
    if skip_8b:
        return
    eight_b = build("llama-3.1-8b", tokenizer, log=log)
    log("P3/P5 (CUDA)  FP8-dynamic streaming of the 8B shapes vs a plain copy")
    size = checkpoint_bytes(eight_b)
    copy = child("copy", str(eight_b), str(work / "copy-8b"))
    shutil.rmtree(work / "copy-8b", ignore_errors=True)
    fp8 = child("quantflow", str(eight_b), {"method": "fp8", "fp8_scheme": "dynamic", "device": CUDA}, None,
                str(work / "fp8-8b"), CUDA)
    shutil.rmtree(work / "fp8-8b", ignore_errors=True)
    results["cuda_P3"] = {"checkpoint_gib": round(size / GIB, 2), "copy_s": copy["seconds"], "fp8_s": fp8["seconds"],
                          "ratio": ratio(fp8["seconds"], copy["seconds"]), "peak_rss_gib": fp8["peak_rss_gib"],
                          "rss_ratio": ratio(fp8["peak_rss_gib"] * GIB, size), "peak_gpu_gib": fp8.get("peak_gpu_gib")}
    log(f"    cuda_P3: {json.dumps(results['cuda_P3'])}")


# ---------------------------------------------------------------- report

def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def host() -> dict:
    from quantflow.serving.environment import cpu_model
    from quantflow.versions import tool_versions

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu_model(), "isa": "AVX-512" if "avx512f" in flags else "AVX2",
            "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
            "gpu": _gpu_name(), "python": platform.python_version(), "versions": tool_versions(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def table(results: dict) -> list[tuple[str, str, str, str]]:
    rows = []

    def add(key: str, label: str, value: str, goal: str = "", met: bool | None = None):
        rows.append((key, label, value, f"{goal} {'met' if met else 'MISSED'}" if met is not None else goal))

    for k, label in (("P1_rtn", "RTN W4A16, 1B"), ("P1_fp8", "FP8-dynamic, 1B"), ("P1_gptq", "GPTQ W4A16, 1B shapes x 2 layers")):
        if k in results:
            r = results[k]
            add("P1", f"quantize stage in the flow / direct llm-compressor ({label})",
                f"{r['ratio']:.3f} ({r['flow_s']:.1f}s / {r['direct_s']:.1f}s)", "<= 1.05", r["ratio"] <= GOALS["P1"])
    if "P2" in results:
        r = results["P2"]
        add("P2", "cached rerun of stages 1-4 / first run (1B)",
            f"{r['ratio']:.3f} ({r['rerun_s']:.1f}s / {r['first_s']:.1f}s)", "<= 0.05", r["ratio"] <= GOALS["P2"])
    if "P3" in results:
        r = results["P3"]
        add("P3", "FP8-dynamic streaming / plain copy (8B, "
            f"{r['checkpoint_gib']} GiB)", f"{r['ratio']:.2f} ({r['fp8_s']:.0f}s / {r['copy_s']:.0f}s), "
            f"peak RSS {r['fp8_peak_rss_gib']:.2f} GiB", "<= 3", r["ratio"] <= GOALS["P3"])
    if "P4" in results:
        r = results["P4"]
        add("P4", "perplexity evaluator vs lm-eval rolling log-likelihood (demo)",
            f"lm-eval time / ours {r['speed_ratio']:.2f}x, relative difference {r['relative_difference']:.1e}")
    for k, label in (("P5_gptq_sequential", "GPTQ, sequential onloading, 1B x 2 layers"),
                     ("P5_rtn_streaming", "RTN W4A16 streaming, 1B"),
                     ("P5_streaming_8b", "FP8 streaming, 8B"), ("P5_validate", "validate stage, 1B")):
        if k in results:
            r = results[k]
            peak = r.get("flow_peak_rss_gib", r.get("peak_rss_gib"))
            add("P5", f"peak RSS / checkpoint size ({label})", f"{r['ratio']:.2f} ({peak:.2f} GiB)",
                "<= 1.5", r["ratio"] <= GOALS["P5"])
    if "P6" in results:
        r = results["P6"]
        add("P6", f"the demo end to end ({r['method']}, with deploy)",
            f"{r['process_s']:.0f}s process, {r['pipeline_s']:.0f}s pipeline, {r['excluding_deploy_s']:.0f}s without deploy")
    for k, label in (("cuda_gptq_1b", "GPTQ W4A16, 1B"), ("cuda_fp8_1b", "FP8-dynamic, 1B")):
        if k in results:
            r = results[k]
            add("P1", f"CUDA: quantflow's quantization step / direct llm-compressor ({label})",
                f"{r['ratio']:.3f} ({r['quantflow_s']:.1f}s / {r['direct_s']:.1f}s)", "<= 1.05", r["ratio"] <= GOALS["P1"])
            add("P5", f"CUDA: peak RSS / checkpoint size ({label})",
                f"{r['rss_ratio']:.2f} ({r['peak_rss_gib']:.2f} GiB host, {r['peak_gpu_gib']} GiB GPU)",
                "<= 1.5", r["rss_ratio"] <= GOALS["P5"])
    if "cuda_P3" in results:
        r = results["cuda_P3"]
        add("P3", f"CUDA: FP8-dynamic streaming / plain copy (8B, {r['checkpoint_gib']} GiB)",
            f"{r['ratio']:.2f} ({r['fp8_s']:.0f}s / {r['copy_s']:.0f}s), peak RSS {r['peak_rss_gib']:.2f} GiB, "
            f"GPU {r['peak_gpu_gib']} GiB", "<= 3", r["ratio"] <= GOALS["P3"])
        add("P5", "CUDA: peak RSS / checkpoint size (FP8 streaming, 8B)", f"{r['rss_ratio']:.2f}", "<= 1.5",
            r["rss_ratio"] <= GOALS["P5"])
    if "S1" in results:
        r = results["S1"]
        add("S1", "stage 1 at size (1B): sha256 speed vs plain read",
            f"{r['sha256_mb_s']:.0f} vs {r['read_mb_s']:.0f} MB/s, hashing peak RSS {r['sha256_peak_rss_gib']:.2f} GiB")
        if "stage1_s" in r:
            add("S1", "stage 1 at size (1B): hash + baseline evaluation",
                f"{r['stage1_s']:.0f}s, peak RSS {r['stage1_peak_rss_gib']:.2f} GiB ({r['stage1_peak_rss_over_size']:.2f}x size)")
    return rows


def print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--skip-8b", action="store_true", help="leave out P3 and the streaming P5 (16 GB on disk)")
    parser.add_argument("--only", action="append", choices=["1b", "gptq", "8b", "perplexity", "demo"])
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/cost-<isa>-<cores>core.json)")
    parser.add_argument("--gpu", action="store_true", help="the CUDA rows only (P1, P3, P5 with GPU memory); "
                        "needs no Prefect, so it runs in a bare CUDA image with llm-compressor added")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder for the built checkpoints (default: the demo's)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](*json.loads(args.args))))
        return
    started = time.perf_counter()
    work = (BENCH_DIR / f"work-{os.getpid()}").resolve()
    # A private state, cache and Prefect home: the first run computes, whatever ran before.
    os.environ.update({"QUANTFLOW_STATE_DIR": str((work / "state").resolve()),
                       "QUANTFLOW_CACHE": str((work / "cache").resolve()),
                       "PREFECT_HOME": str((work / "prefect").resolve()),
                       "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"})
    work.mkdir(parents=True)
    results: dict = {"host": host()}
    parts = args.only or ["1b", "gptq", "8b", "perplexity", "demo"]
    if args.skip_8b and "8b" in parts:
        parts.remove("8b")
    kind = "cuda-" + (results["host"]["gpu"] or "none").split()[-1].lower() if args.gpu else results["host"]["isa"].lower().replace("-", "")
    out = args.out or REPO / "benchmarks" / "results" / f"cost-{kind}-{os.cpu_count()}core.json"
    try:
        if args.gpu:
            measure_gpu(work, args.tokenizer or DEMO / "model", results, args.skip_8b)
            parts = []
        else:
            from quantflow.demo.assets import build_demo_assets

            build_demo_assets(DEMO, log=lambda *_: None)
        tok = args.tokenizer or DEMO / "model"
        if "1b" in parts:
            measure_1b(work, build("llama-3.2-1b", tok, log=log), results)
        if "gptq" in parts:
            measure_gptq(work, build("llama-3.2-1b-2layers", tok, log=log), results)
        if "8b" in parts:
            measure_8b(work, build("llama-3.1-8b", tok, log=log), results)
        if "perplexity" in parts:
            measure_perplexity(results)
        if "demo" in parts:
            measure_demo(work, results)
    finally:
        if not args.gpu:
            from quantflow.platform.prefect_server import stop_local_server

            stop_local_server()
        results["benchmark_s"] = round(time.perf_counter() - started, 1)
        results["table"] = table(results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        shutil.rmtree(work, ignore_errors=True)
    h = results["host"]
    print(f"\nquantflow cost at size: {h['cpu']} ({h['isa']}), {h['cores']} cores, {h['memory_gib']} GiB, "
          f"{h['gpu'] or 'no GPU'}; torch {h['versions'].get('torch')}, llmcompressor {h['versions'].get('llmcompressor')}; {h['date']}")
    print_table([("", "measure", "value", "goal"), *results["table"]])
    print(f"\n{results['benchmark_s']:.0f}s in all; results in {out}")


if __name__ == "__main__":
    main()
