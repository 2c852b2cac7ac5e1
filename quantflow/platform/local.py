"""`make up` / `make down`: a Prefect server, one process worker per work pool, the
deployments and concurrency limits, all on this machine — the same files a team uses on
a cluster, with process pools standing in for the GPU classes.

The server requires PREFECT_SERVER_API_AUTH_STRING when it is set; clients (this code,
workers, flow runs) send PREFECT_API_AUTH_STRING. S3 credentials and endpoint are read
from the environment by every process (AWS_* variables), never passed as parameters.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from quantflow.platform.topology import check_services, load_env_file
from quantflow.platform.ui_proxy import proxy_port, start_ui_proxy, stop_ui_proxy
from quantflow.platform.prefect_server import ensure_local_server, stop_local_server
from quantflow.processes import group_members, reused, start_detached, stop_groups
from quantflow.serving.registry import state_dir

log = logging.getLogger("quantflow.platform")
REPO = Path(__file__).resolve().parents[2]
POOLS = ("cpu", "gpu-a100", "gpu-h100")
GPU_SLOTS = {"gpu-a100": 1, "gpu-h100": 1}
RECORD = "platform.json"


def _prefect_bin() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def client_env(api_url: str) -> dict[str, str]:
    # PREFECT_LOGGING_EXTRA_LOGGERS: quantflow's own log lines (each stage's progress, the
    # gate's verdict) go to the run's logs in the UI, not only to the worker's stderr.
    return {"PREFECT_LOGGING_EXTRA_LOGGERS": "quantflow", **os.environ, "PREFECT_API_URL": api_url,
            "QUANTFLOW_HOME": str(REPO), "QUANTFLOW_STATE_DIR": str(state_dir())}


def create_pools_and_limits(api_url: str, pools=POOLS, slots=GPU_SLOTS) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
                log.info("work pool %s created", pool)
            except ObjectAlreadyExists:
                pass
        existing = {limit.name for limit in client.read_global_concurrency_limits(limit=200)}
        for name, limit in slots.items():
            if name not in existing:  # a second `make up` on PostgreSQL: no IntegrityError noise
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def register_deployments(api_url: str, prefect_file: Path = REPO / "deployments" / "prefect.yaml") -> None:
    out = subprocess.run([_prefect_bin(), "--no-prompt", "deploy", "--all", "--prefect-file",
                          str(prefect_file)], cwd=REPO, env=client_env(api_url),
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"prefect deploy failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def start_workers(api_url: str, pools=POOLS, poll_s: int = 2, per_pool: dict[str, int] | None = None,
                  limit: int | None = None) -> dict[str, dict]:
    """One process worker per pool (`per_pool` asks for more of a pool). `limit`: flow runs
    one worker runs at once (Prefect's default is no limit: a worker starts every run it
    picks up, which on a small machine means every queued run at once)."""
    logs = state_dir() / "workers"
    env = {**client_env(api_url), "PREFECT_WORKER_QUERY_SECONDS": str(poll_s)}
    workers = {}
    for pool in pools:
        for i in range((per_pool or {}).get(pool, 1)):
            key = pool if i == 0 else f"{pool}-{i + 1}"
            _, workers[key] = start_detached(
                [_prefect_bin(), "worker", "start", "--pool", pool, "--type", "process",
                 "--name", f"{key}-{os.uname().nodename}", *(["--limit", str(limit)] if limit else [])],
                logs / f"{key}.log", env, cwd=str(REPO))
    return workers


RESULTS_BLOCK = "remote-file-system/quantflow-results"


def configure_result_storage(api_url: str, results_uri: str) -> str:
    """Prefect results and cache records on shared storage (s3://…), so a stage cached by
    one worker is a cache hit for every other. Credentials stay in the environment."""
    from prefect.filesystems import RemoteFileSystem
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        RemoteFileSystem(basepath=results_uri.rstrip("/")).save(RESULTS_BLOCK.split("/")[1], overwrite=True)
    # Every process started from here on (workers, their flow runs) uses it by default.
    os.environ["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = RESULTS_BLOCK
    os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
    return RESULTS_BLOCK


def running_platform() -> dict | None:
    path = state_dir() / RECORD
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    alive = [w for w in record.get("workers", {}).values() if not reused(w["pid"], w.get("create_time"))
             and group_members(w["pid"])]
    return record if alive else None


def up(port: int = 4200, pools=POOLS, with_workers: bool = True, env_file: str | None = None,
       per_pool: dict[str, int] | None = None, worker_limit: int | None = None) -> dict:
    running = running_platform()
    if running:  # a second `make up` must not start a second set of workers
        log.info("the platform is already up (%s); `make down` stops it", running["api_url"])
        return running
    if env_file:
        load_env_file(env_file)
    topology = check_services()
    log.info("Prefect database: %s; messaging and stage locks: %s",
             topology["database_url"], topology["broker"])
    ui_port = proxy_port(topology["database_url"])
    ui_api_url = f"http://127.0.0.1:{ui_port}/api" if ui_port else None
    api_url = ensure_local_server(port=port, embedded=False, ui_api_url=ui_api_url)
    ui_proxy = start_ui_proxy(state_dir() / "ui-proxy", ui_port, port) if ui_port else None
    results_uri = os.environ.get("QUANTFLOW_RESULTS_URI")
    if results_uri:
        configure_result_storage(api_url, results_uri)
    create_pools_and_limits(api_url, pools)
    register_deployments(api_url)
    record = {"api_url": api_url, "port": port, "topology": topology, "ui_proxy": ui_proxy,
              "ui_api_url": ui_api_url,
              "workers": start_workers(api_url, pools, per_pool=per_pool, limit=worker_limit)
              if with_workers else {}}
    from quantflow.platform.automations import install_automations, install_recovery

    record["automations"] = install_recovery(api_url)
    webhook = os.environ.get("QUANTFLOW_ALERT_WEBHOOK_URL")
    if webhook:
        record["automations"] += install_automations(api_url, webhook)
    (state_dir() / RECORD).write_text(json.dumps(record, indent=2))
    return record


def restart_server() -> str:
    """Stop the platform's Prefect server and start it again on the same address with the
    same database (workers and flow runs reconnect; used to prove nothing is lost)."""
    record = json.loads((state_dir() / RECORD).read_text())
    stop_local_server()
    return ensure_local_server(port=record["port"], embedded=False, ui_api_url=record.get("ui_api_url"))


def down() -> None:
    path = state_dir() / RECORD
    if path.exists():
        # Workers turn SIGTERM into a clean shutdown; all are stopped at once.
        record = json.loads(path.read_text())
        stop_groups(list(record.get("workers", {}).values()), waits=(15, 5, 5))
        stop_ui_proxy(record.get("ui_proxy"))
        path.unlink()
    stop_local_server()
