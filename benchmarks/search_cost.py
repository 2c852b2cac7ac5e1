"""Benchmark: an N-candidate `quantflow search` against the N separate `quantflow run`s a
person would start by hand, measured in one run on the demo model.

  separate  N x `quantflow run --no-deploy`, each in its own folder (each computes its own
            baseline and calibration set, as runs with different names do)
  one dir   the same N runs in one folder, one after another (stage 1 and 2 cached after
            the first: the manual way to share the baseline)
  search    `quantflow search --no-deploy` in sweep mode over the same N candidates

Every variant starts from an empty cache (a private QUANTFLOW_CACHE, state and Prefect home
each), and the embedded Prefect server is started before the clock, so each pays only for
its own work. Printed: process wall time, flow wall time and the ratios search / separate.

    .venv/bin/python benchmarks/search_cost.py   (make benchmark-search)

Results: benchmarks/results/search-<isa>-<cores>core.json; docs/search.md shows them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_cost import host, quantflow_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [{"method": "rtn", "bits": 4, "group_size": 128}, {"method": "gptq", "bits": 4, "group_size": 128},
              {"method": "fp8", "fp8_scheme": "dynamic"}, {"method": "w8a8"}]


def base_config(work: Path, name: str) -> dict:
    data = yaml.safe_load((REPO / "configs" / "demo-search.yaml").read_text())
    data.update(name=name, output_dir=str(work / "runs" / name))
    data["deploy"]["enabled"] = False
    data["validation"]["consistency"]["max_kl"] = None  # every candidate passes: all run, none skipped
    return data


def fresh_env(work: Path, variant: str) -> None:
    """An empty cache, state and Prefect home for each variant: it computes everything."""
    root = work / variant
    os.environ.update({"QUANTFLOW_STATE_DIR": str(root / "state"), "QUANTFLOW_CACHE": str(root / "cache"),
                       "PREFECT_HOME": str(root / "prefect")})
    from quantflow.platform.prefect_server import ensure_local_server, stop_local_server

    stop_local_server()
    ensure_local_server()  # started before the clock: every variant pays only for its work


def timed_cli(*args: str) -> tuple[float, str]:
    rc, wall, tail = quantflow_cli(*args)
    if rc != 0:
        raise RuntimeError(f"quantflow {' '.join(args)} exited {rc}:\n{tail}")
    return wall, tail


def flow_s(out: Path) -> float:
    return json.loads((out / "pipeline_summary.json").read_text())["total_wall_s"]


def separate(work: Path, same_folder: bool) -> dict:
    variant = "onedir" if same_folder else "separate"
    print(f"{len(CANDIDATES)} x quantflow run --no-deploy, {'one folder' if same_folder else 'own folders'}",
          flush=True)
    fresh_env(work, variant)
    process = flow = 0.0
    for i, quant in enumerate(CANDIDATES):
        cfg = base_config(work / variant, "runs" if same_folder else f"run{i}")
        cfg.pop("search")
        cfg["quant"] = quant
        path = work / f"{variant}{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        wall, _ = timed_cli("run", "--config", str(path), "--no-deploy")
        process += wall
        flow += flow_s(Path(cfg["output_dir"]))
    return {"process_s": round(process, 2), "flow_s": round(flow, 2)}


def search(work: Path) -> dict:
    print(f"quantflow search --no-deploy, sweep over {len(CANDIDATES)} candidates", flush=True)
    fresh_env(work, "search")
    cfg = base_config(work / "search", "search")
    cfg["search"] = {"mode": "sweep", "candidates": CANDIDATES}
    path = work / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    wall, _ = timed_cli("search", "--config", str(path), "--no-deploy")
    out = Path(cfg["output_dir"])
    report = json.loads((out / "search_report.json").read_text())
    assert all(o["status"] in ("passed", "chosen") for o in report["candidates"]), report["candidates"]
    return {"process_s": round(wall, 2), "flow_s": flow_s(out)}


def main() -> None:
    from quantflow.demo.assets import build_demo_assets
    from quantflow.platform.prefect_server import stop_local_server

    build_demo_assets(REPO / ".cache" / "demo", log=lambda *_: None)
    work = (REPO / ".cache" / "bench" / f"search-{os.getpid()}").resolve()
    work.mkdir(parents=True)
    started = time.perf_counter()
    results: dict = {"host": host(), "candidates": CANDIDATES}
    try:
        results["separate"] = separate(work, same_folder=False)
        results["one_folder"] = separate(work, same_folder=True)
        results["search"] = search(work)
    finally:
        stop_local_server()
        shutil.rmtree(work, ignore_errors=True)
    s, sep, one = results["search"], results["separate"], results["one_folder"]
    results["ratios"] = {"search_vs_separate_process": round(s["process_s"] / sep["process_s"], 3),
                         "search_vs_separate_flow": round(s["flow_s"] / sep["flow_s"], 3),
                         "search_vs_one_folder_process": round(s["process_s"] / one["process_s"], 3)}
    results["benchmark_s"] = round(time.perf_counter() - started, 1)
    h = results["host"]
    kind = h["isa"].lower().replace("-", "")
    out = REPO / "benchmarks" / "results" / f"search-{kind}-{os.cpu_count()}core.json"
    out.write_text(json.dumps(results, indent=2))
    n = len(CANDIDATES)
    print(f"\n{n}-candidate search vs {n} runs, demo model: {h['cpu']} ({h['isa']}), {h['cores']} cores; {h['date']}")
    print(f"  {'':<34} {'process (s)':>12} {'flow (s)':>10}")
    for label, r in ((f"{n} x quantflow run, own folders", sep), (f"{n} x quantflow run, one folder", one),
                     (f"quantflow search (sweep, {n})", s)):
        print(f"  {label:<34} {r['process_s']:>12.1f} {r['flow_s']:>10.1f}")
    r = results["ratios"]
    print(f"  search / separate runs: {r['search_vs_separate_process']:.3f} (process), "
          f"{r['search_vs_separate_flow']:.3f} (flow); search / runs in one folder: "
          f"{r['search_vs_one_folder_process']:.3f} (process)")
    print(f"{results['benchmark_s']:.0f}s in all; results in {out}")


if __name__ == "__main__":
    main()
