"""Benchmark: serving performance of the demo model, baseline vs the scheme this host serves,
with a longer load than the tests use (the tests check that numbers exist; this prints
them). Same vLLM settings for both (configs/demo.yaml's deploy section), vLLM's own
`bench serve`, one run, ratios quantized / baseline.

    make benchmark   (or: .venv/bin/python benchmarks/serving_performance.py)
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOAD = {"enabled": True, "concurrency": [1, 4, 8], "num_prompts": 32, "input_len": 64, "output_len": 32}


def main() -> None:
    os.chdir(REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from quantflow.config import PerformanceCheck, load_config
    from quantflow.demo.assets import DEFAULT_DIR, build_demo_assets
    from quantflow.demo.scheme_choice import choose_demo_scheme
    from quantflow.serving.environment import cpu_model
    from quantflow.serving.performance import compare_performance, serve_and_measure
    from quantflow.tasks.calibration import build_calibration
    from quantflow.tasks.checkpoint import prepare_checkpoint
    from quantflow.tasks.quantize import quantize_model

    build_demo_assets(REPO / DEFAULT_DIR, log=lambda *_: None)
    config, note = choose_demo_scheme(load_config(REPO / "configs" / "demo.yaml"))
    perf = PerformanceCheck(**LOAD)
    with tempfile.TemporaryDirectory(prefix="quantflow-perf-bench-") as tmp:
        validation = config.validation.model_copy(update={"lm_eval": config.validation.lm_eval.model_copy(
            update={"enabled": False})})
        ckpt = prepare_checkpoint(config.model, validation, tmp)
        calib = build_calibration(config.calibration, ckpt, tmp) if config.quant.needs_calibration else None
        quant = quantize_model(config.quant, ckpt, calib, tmp)
        base = serve_and_measure(ckpt.local_path, config.deploy, perf)
        q = serve_and_measure(str(Path(tmp) / "quantized_model"), config.deploy, perf)
    section, _ = compare_performance(base, q, perf)
    isa = "AVX-512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2"
    print(f"host: {cpu_model()} ({isa}, {os.cpu_count()} cores); scheme {quant.label}"
          + (f" ({note})" if note else ""))
    print(f"load: {perf.num_prompts} random prompts per level, {perf.input_len} tokens in, "
          f"{perf.output_len} out, deploy dtype {config.deploy.dtype}")
    print(f"{'concurrency':>11} {'base tok/s':>11} {'quant tok/s':>12} {'ratio':>6} {'base p99 TTFT':>14} "
          f"{'quant p99 TTFT':>15} {'base p99 TPOT':>14} {'quant p99 TPOT':>15}")
    for b, qq, r in zip(base["levels"], q["levels"], section["ratios"]):
        print(f"{b['concurrency']:>11} {b['output_throughput']:>11.1f} {qq['output_throughput']:>12.1f} "
              f"{r['output_throughput_ratio']:>6.2f} {b['p99_ttft_ms']:>12.1f}ms {qq['p99_ttft_ms']:>13.1f}ms "
              f"{b['p99_tpot_ms']:>12.1f}ms {qq['p99_tpot_ms']:>13.1f}ms")
    print("p99 end-to-end latency (what monitoring's bound starts from): "
          + ", ".join(f"c={b['concurrency']}: {b['p99_e2el_ms']:.0f} -> {qq['p99_e2el_ms']:.0f} ms"
                      for b, qq in zip(base["levels"], q["levels"])))
    print(f"model load: {base['load_s']} s -> {q['load_s']} s; server RSS {base['server_rss_gib']} -> "
          f"{q['server_rss_gib']} GiB; KV cache {base['kv_cache_tokens']} -> {q['kv_cache_tokens']} tokens")
    out = REPO / "benchmarks" / "results" / f"serving-performance-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"isa": isa, "cpu": cpu_model(), "cores": os.cpu_count(),
                               "date": time.strftime("%Y-%m-%d"), "scheme": quant.label,
                               "load": LOAD, "performance": section}, indent=2) + "\n")
    print(f"written: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
