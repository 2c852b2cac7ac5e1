"""python -m quantflow.platform up|down (what `make up` / `make down` run)."""

from __future__ import annotations

import argparse
import logging

from quantflow.platform.local import POOLS, down, up
from quantflow.prefect_server import ui_url


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m quantflow.platform")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "down":
        down()
        print("stopped the workers and the local Prefect server")
        return
    record = up(port=args.port)
    print(f"Prefect UI:  {ui_url(record['api_url'])}")
    print(f"work pools:  {', '.join(POOLS)} (one process worker each; logs in .quantflow/workers/)")
    print("deployments: quantize-pipeline/quantize-pipeline, requantize/requantize, "
          "quality-monitor/quality-monitor, quantflow-stage/gpu-a100, quantflow-stage/gpu-h100")
    print("start a run: quantflow submit --config configs/demo.yaml   (make down stops it all)")


if __name__ == "__main__":
    main()
