"""Prometheus exporter for the seed's metrics, read from persisted monitor state.

The exporter holds no state of its own: every scrape reads the deployment registry and
each deployment's monitor state, so monitoring rounds can run anywhere (a scheduled
Prefect flow, the pipeline's stage 6) and a restarted exporter reports the same numbers.

    python -m quantflow.monitoring.exporter --host 127.0.0.1 --port 9108
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Iterator

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.registry import Collector, CollectorRegistry

from quantflow.config import MonitorConfig
from quantflow.monitoring.monitor import state_uri
from quantflow.monitoring.state import MonitorState, load_state
from quantflow.serving.registry import DeploymentRegistry
from quantflow.storage.store import ArtifactStore

log = logging.getLogger("quantflow.exporter")


def deployment_states(registry: DeploymentRegistry) -> Iterator[MonitorState]:
    for name in registry.names():
        record = registry.active(name)
        if not record:
            continue
        cfg = MonitorConfig.model_validate(record.get("monitor") or {})
        try:
            yield load_state(ArtifactStore(state_uri(record, cfg)), name)
        except Exception as err:  # noqa: BLE001 - one unreadable state must not hide the others
            log.warning("exporter: cannot read monitor state of %s: %s", name, err)


class MonitorCollector(Collector):
    def __init__(self, registry: DeploymentRegistry):
        self.registry = registry

    def collect(self):
        quality = GaugeMetricFamily("llm_quantization_quality_score",
                                    "Mean probe score over the rolling window (1 = all correct)",
                                    labels=["model", "quantization"])
        latency = HistogramMetricFamily("llm_inference_latency_seconds",
                                        "Latency of completions made by the monitor",
                                        labels=["model", "operation"])
        throughput = GaugeMetricFamily("llm_token_throughput_per_second",
                                       "Generated tokens per second in the latest measurement",
                                       labels=["model"])
        alerts = CounterMetricFamily("llm_quality_regression_alerts",
                                     "Alerts raised by the monitor", labels=["model", "severity"])
        for st in deployment_states(self.registry):
            model = st.model or st.deployment
            if st.quality_score is not None:
                quality.add_metric([model, st.quantization], st.quality_score)
            for op, h in st.latency.items():
                buckets = [(str(b), float(c)) for b, c in zip(h.buckets, h.counts)]
                buckets.append(("+Inf", float(h.count)))
                latency.add_metric([model, op], buckets, h.sum)
            if st.throughput_tps is not None:
                throughput.add_metric([model], st.throughput_tps)
            for severity in sorted(set(st.alerts) | {"warning", "critical"}):
                alerts.add_metric([model, severity], float(st.alerts.get(severity, 0)))
        yield from (quality, latency, throughput, alerts)


def serve(host: str, port: int) -> None:
    from prometheus_client import start_http_server

    reg = CollectorRegistry()
    reg.register(MonitorCollector(DeploymentRegistry()))
    start_http_server(port, addr=host, registry=reg)
    log.info("exporter: metrics on http://%s:%d/metrics", host, port)
    while True:
        time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9108)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
