"""python -m quantflow.platform up|down (what `make up` / `make down` run)."""

from __future__ import annotations

import argparse
import logging

from quantflow.platform.local import POOLS, down, up
from quantflow.platform.topology import TopologyError
from quantflow.platform.prefect_server import ui_url


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m quantflow.platform")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--env-file", help="KEY=VALUE file of Prefect settings, e.g. infra/single-box.env "
                        "(PostgreSQL + Redis); variables already in the environment win")
    parser.add_argument("--workers", type=int, default=1, help="process workers on the cpu pool")
    parser.add_argument("--worker-limit", type=int, help="flow runs each worker runs at once "
                        "(default: no limit, Prefect's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "down":
        down()
        print("stopped the workers and the local Prefect server")
        return
    try:
        record = up(port=args.port, env_file=args.env_file, per_pool={"cpu": args.workers},
                    worker_limit=args.worker_limit)
    except TopologyError as exc:
        raise SystemExit(f"error: {exc}") from None
    topo = record.get("topology", {})
    print(f"Prefect UI:  {ui_url(record['api_url'])}")
    print(f"database:    {topo.get('database_url', 'sqlite')}; messaging and stage locks: "
          f"{topo.get('broker', 'memory')}")
    print(f"work pools:  {', '.join(POOLS)} ({args.workers} process worker(s) on cpu, one on each GPU pool; "
          "logs in .quantflow/workers/)")
    print("deployments: quantize-pipeline/quantize-pipeline, quantize-search/quantize-search, requantize/requantize, "
          "quality-monitor/quality-monitor, quantflow-stage/gpu-a100, quantflow-stage/gpu-h100")
    print("start a run: quantflow submit --config configs/demo.yaml   (make down stops it all)")


if __name__ == "__main__":
    main()
