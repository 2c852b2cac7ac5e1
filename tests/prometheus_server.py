"""Debian's Prometheus and promtool for tests: the shipped rules, dashboard and scrape config,
parsed statically or run for real against a live exporter and vLLM server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "infra" / "monitoring"
RULES = MONITORING / "prometheus-rules.yaml"
RULE_TESTS = MONITORING / "prometheus-rules.test.yaml"
SCRAPE_CONFIG = MONITORING / "prometheus.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
METRICS_DOC = REPO / "docs" / "monitoring.md"

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: run scripts/system-packages.sh "
                                    "(Debian's prometheus package, requirements/debian.txt)")
needs_prometheus = pytest.mark.skipif(None in (PROMETHEUS, PROMTOOL), reason="prometheus missing: run "
                                      "scripts/system-packages.sh (requirements/debian.txt)")


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


# A small PromQL tokenizer, enough to find the series selectors of the shipped expressions:
# grouping clauses, ranges, strings, numbers and durations are skipped; a name followed by "(" is a
# function; aggregation operators and keywords are not metric names.
_TOKENS = re.compile(r"""
    (?P<group>\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\))
  | (?P<range>\[[^\]]*\])
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>\b\d(?:[eE][+-]|[0-9a-zA-Z.])*)   # also 1e+5, 0x1f and durations (5m)
  | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?P<call>\()?(?P<matchers>\{[^}]*\})?
""", re.X)
_NOT_METRICS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "sum", "min", "max", "avg", "group",
                "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"}


def selectors(expr: str) -> set[str]:
    """The series selectors in an expression, e.g. `metric{label="x"}`."""
    found = set()
    for m in _TOKENS.finditer(expr):
        name = m.group("name")
        if name and not m.group("call") and name not in _NOT_METRICS:
            found.add(name + (m.group("matchers") or ""))
    return found


def metric_name(selector: str) -> str:
    return selector.split("{", 1)[0]


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """docs/monitoring.md's table of exported metrics: name -> (type, label names)."""
    text = METRICS_DOC.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(llm_\w+)` \| (\w+)[^|]* \| ([^|]+) \|$", text, re.M)
    # Label values are listed in parentheses after a label's name: drop them.
    return {name: (kind, set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels))))
            for name, kind, labels in rows}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


def scrape_config(targets: dict[str, list[str]], interval_s: int = 1) -> dict:
    """The shipped prometheus.yaml with each job's targets replaced, scraping and evaluating
    every `interval_s`, and its rule files made absolute."""
    doc = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    assert set(jobs) == set(targets), f"{SCRAPE_CONFIG} has jobs {sorted(jobs)}, the test fills {sorted(targets)}"
    for name, job in jobs.items():
        job["static_configs"] = [{"targets": targets[name]}]
    doc["global"] = {**doc.get("global", {}), "scrape_interval": f"{interval_s}s",
                     "evaluation_interval": f"{interval_s}s"}
    doc["rule_files"] = [str(SCRAPE_CONFIG.parent / f) for f in doc.get("rule_files", [])]
    return doc


def target_of(url: str) -> str:
    """host:port of an http URL (what a static_config names)."""
    return urlsplit(url).netloc


class PrometheusServer:
    """A real Prometheus on a free port with its own temporary storage; stopped on exit."""

    def __init__(self, workdir: Path, config: dict, port: int):
        self.workdir, self.port = workdir, port
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = workdir / "prometheus.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "PrometheusServer":
        check = promtool("check", "config", str(self.config_path))
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            self.wait_for(self._ready, "Prometheus to become ready", 60)
        except BaseException:
            self.__exit__()  # a failed start leaves no process behind either
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_for(self, check, what: str, timeout_s: float):
        """Poll `check` until it returns something truthy (a wait, not a speed assertion)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = check()
            if result or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not result:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; log: "
                                 f"{self.log_path.read_text()[-2000:]}")
        return result

    def api(self, path: str, **params):
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, r.text[:500])
        return body["data"]
