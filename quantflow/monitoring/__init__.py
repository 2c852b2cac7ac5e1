"""Production monitoring: quality probes, latency checks, alerts, Prometheus metrics."""
