"""Benchmark: the platform under load, PostgreSQL + Redis against SQLite, in one run.

For each database: `make up` (isolated: its own state folder, port and database, two
process workers on the cpu pool), one run to fill the stage cache, then RUNS REST-triggered
runs of a cheap config (cached stages, no lm-eval, no deploy) submitted at once from
several threads, each with its own idempotency key. Counted:
- API errors: 5xx answers and refused connections seen by the submitting client, plus
  "database is locked" and 5xx retries in the server's and workers' logs;
- lost runs: runs not COMPLETED within the bound;
- wall time from the first submission to the last completion.
Then, on PostgreSQL only, the restart check: RESTART_RUNS more runs, the server is
restarted while they run, the client submits the same idempotency keys again, and every
key must map to exactly one completed run.

    make benchmark   (or: .venv/bin/python benchmarks/platform_load.py [--runs 20])
Needs PostgreSQL at 127.0.0.1:5432 and Redis at 127.0.0.1:6379 for the first column.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from services import pg_query, production_services, services_reason  # noqa: E402

from quantflow.platform.submit import PrefectREST  # noqa: E402

DEPLOYMENT = "quantize-pipeline/quantize-pipeline"
LOG_ERRORS = re.compile(r"database is locked|retryable status code 5\d\d|Server error '5\d\d")
REDIS_BENCH_DB = 14


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cheap_config(output_dir: Path) -> dict:
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data.update(name="load", output_dir=str(output_dir))
    data["validation"]["lm_eval"]["enabled"] = False
    data["deploy"]["enabled"] = False
    return data


@contextmanager
def platform(kind: str, workdir: Path, worker_limit: int | None):
    """`make up` with its own state folder, port, database and Redis index."""
    from quantflow.platform.local import down, up

    saved = dict(os.environ)
    state = workdir / kind
    os.environ.update({"QUANTFLOW_STATE_DIR": str(state), "PREFECT_LOCAL_STORAGE_PATH": str(state / "results"),
                       "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"})
    services = production_services("quantflow_load", REDIS_BENCH_DB) if kind == "postgresql" else nullcontext()
    with services:
        try:
            yield up(port=free_port(), per_pool={"cpu": 2, "gpu-a100": 0, "gpu-h100": 0},
                     worker_limit=worker_limit), state
        finally:
            down()
            os.environ.clear()
            os.environ.update(saved)


def log_errors(state: Path) -> int:
    logs = [state / "prefect" / "server.log", *sorted((state / "workers").glob("*.log"))]
    return sum(len(LOG_ERRORS.findall(p.read_text(errors="replace"))) for p in logs if p.exists())


def submit_all(api: PrefectREST, params: dict, keys: list[str]) -> dict[str, str]:
    def one(key: str) -> tuple[str, str]:
        return key, api.create_flow_run(DEPLOYMENT, params, idempotency_key=key)["id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, keys))


def wait_all(api: PrefectREST, ids: list[str], bound_s: float) -> dict[str, str]:
    deadline = time.monotonic() + bound_s
    states = {}
    for run_id in ids:
        final = api.wait(run_id, timeout_s=max(1.0, deadline - time.monotonic()), poll_s=2)
        states[run_id] = final["state_type"]
    return states


def load_phase(kind: str, workdir: Path, runs: int, bound_s: float, worker_limit: int | None) -> dict:
    with platform(kind, workdir, worker_limit) as (record, state):
        api = PrefectREST(record["api_url"], retries=8)
        params = {"config": cheap_config(workdir / f"out-{kind}")}
        prime = api.create_flow_run(DEPLOYMENT, params, idempotency_key=f"{kind}-prime")
        primed = api.wait(prime["id"], timeout_s=900)
        if primed["state_type"] != "COMPLETED":
            raise SystemExit(f"{kind}: the priming run ended {primed['state_name']}: {primed['state']['message']}")
        errors_before = log_errors(state)
        api.server_errors.clear()
        api.connection_errors = 0
        start = time.perf_counter()
        ids = submit_all(api, params, [f"{kind}-load-{i}" for i in range(runs)])
        submitted_s = time.perf_counter() - start
        states = wait_all(api, list(ids.values()), bound_s)
        wall_s = time.perf_counter() - start
        result = {"database": record["topology"]["database"], "broker": record["topology"]["broker"],
                  "runs": runs, "completed": sum(s == "COMPLETED" for s in states.values()),
                  "lost": sum(s != "COMPLETED" for s in states.values()),
                  "api_errors": len(api.server_errors) + api.connection_errors + log_errors(state) - errors_before,
                  "client_5xx": len(api.server_errors), "submit_s": round(submitted_s, 1),
                  "wall_s": round(wall_s, 1), "runs_per_min": round(60 * runs / wall_s, 2)}
        if kind == "postgresql":
            result["restart"] = restart_phase(api, params, record, kind, bound_s)
        return result


def restart_phase(api: PrefectREST, params: dict, record: dict, kind: str, bound_s: float) -> dict:
    from quantflow.platform.local import restart_server

    keys = [f"{kind}-restart-{i}" for i in range(RESTART_RUNS)]
    ids = submit_all(api, params, keys)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # restart once runs are executing, not only queued
        if any(api.flow_run(i)["state_type"] == "RUNNING" for i in ids.values()):
            break
        time.sleep(1)
    start = time.perf_counter()
    restart_server()
    down_s = time.perf_counter() - start
    again = submit_all(api, params, keys)  # a client retrying after the outage: same keys
    states = wait_all(api, list(ids.values()), bound_s)
    not_completed = {}
    for key, run_id in ids.items():
        if states[run_id] != "COMPLETED":
            run = api.flow_run(run_id)
            not_completed[key] = f"{run['state_name']}: {(run['state'] or {}).get('message', '')[:300]}"
    database = record["topology"]["database_url"].rsplit("/", 1)[-1]
    rows = pg_query("select idempotency_key, count(*) as n from flow_run where idempotency_key like "
                    f"'{kind}-restart-%' group by idempotency_key", database)
    per_key = {r["idempotency_key"]: r["n"] for r in rows}
    crashed = pg_query("select count(distinct s.flow_run_id) as n from flow_run_state s join flow_run r "
                       f"on r.id = s.flow_run_id where s.type = 'CRASHED' and r.idempotency_key like "
                       f"'{kind}-restart-%'", database)[0]["n"]
    return {"runs": RESTART_RUNS, "restart_s": round(down_s, 1),
            "same_ids_after_restart": again == ids,
            "completed": sum(s == "COMPLETED" for s in states.values()),
            "lost": sum(1 for k in keys if per_key.get(k, 0) == 0 or states[ids[k]] != "COMPLETED"),
            "duplicated": sum(1 for k in keys if per_key.get(k, 0) > 1), "not_completed": not_completed,
            # runs whose process crashed in the outage and that quantflow-retry-crashed-runs
            # scheduled again (same run, same key)
            "crashed_then_retried": crashed}


RESTART_RUNS = 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--bound-s", type=float, default=1200, help="time allowed for each phase's runs")
    parser.add_argument("--worker-limit", type=int, default=2,
                        help="flow runs each of the two workers runs at once (0: no limit)")
    args = parser.parse_args()
    reason = services_reason()
    kinds = ["sqlite"] if reason else ["postgresql", "sqlite"]
    if reason:
        print(f"PostgreSQL + Redis column skipped: {reason}")
    from quantflow.demo.assets import DEFAULT_DIR, build_demo_assets

    build_demo_assets(REPO / DEFAULT_DIR, log=lambda *_: None)
    os.chdir(REPO)
    results = {}
    with tempfile.TemporaryDirectory(prefix="quantflow-load-") as tmp:
        for kind in kinds:
            print(f"{kind}: {args.runs} runs across 2 process workers (limit {args.worker_limit or 'none'} "
                  "each) ...", flush=True)
            results[kind] = load_phase(kind, Path(tmp), args.runs, args.bound_s, args.worker_limit or None)
    print()
    print(f"{'':<22}" + "".join(f"{k:>14}" for k in results))
    for field in ("runs", "completed", "lost", "api_errors", "client_5xx", "submit_s", "wall_s", "runs_per_min"):
        print(f"{field:<22}" + "".join(f"{str(r[field]):>14}" for r in results.values()))
    if "postgresql" in results:
        print(f"restart under load (PostgreSQL): {json.dumps(results['postgresql']['restart'])}")
    if len(results) == 2:
        ratio = results["sqlite"]["wall_s"] / results["postgresql"]["wall_s"]
        print(f"wall time ratio sqlite / postgresql: {ratio:.2f}")
    host = socket.gethostname()
    out = REPO / "benchmarks" / "results" / f"platform-load-{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from quantflow.serving.environment import cpu_model

    isa = "AVX-512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2"
    print(f"host: {cpu_model()} ({isa}, {os.cpu_count()} cores)")
    out.write_text(json.dumps({"worker_limit": args.worker_limit, "isa": isa, "cpu": cpu_model(), "cores": os.cpu_count(),
                               "date": time.strftime("%Y-%m-%d"),
                               "results": results}, indent=2) + "\n")
    print(f"written: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
