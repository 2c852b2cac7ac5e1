"""Operating deployments one at a time: `quantflow deployments` lists them, `quantflow stop
NAME` stops one and leaves the others serving, `quantflow rollback NAME` brings back an
earlier revision at the same address (issue 21, items 2 and 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from conftest import free_port, free_port_pair, needs_serving
from helpers import complete, scrape, server_processes, stop_deployment
from quantflow.errors import InputError, StageError
from quantflow.serving.registry import DeploymentRegistry


def cli(*args: str, state: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"QUANTFLOW_STATE_DIR": state} if state else {})}
    return subprocess.run([sys.executable, "-m", "quantflow.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def cli_here(capsys, *args: str, state: str) -> subprocess.CompletedProcess:
    """The same command line in this process (no interpreter start per call): its exit
    code and what it printed."""
    from quantflow.cli import main

    saved = dict(os.environ)
    os.environ["QUANTFLOW_STATE_DIR"] = state
    try:
        code = main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_stopping_an_unknown_name_is_refused_naming_it(tmp_path):
    empty = cli("deployments", state=str(tmp_path))
    assert empty.returncode == 0 and "no deployments are live here" in empty.stdout, empty.stderr
    refused = cli("stop", "nope", state=str(tmp_path))
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "no deployment named 'nope' is live here (live: none)" in refused.stderr, refused.stderr
    assert "quantflow deployments` lists them" in refused.stderr


def test_each_release_of_a_name_gets_the_next_revision(tmp_path):
    registry = DeploymentRegistry(tmp_path)
    for expected in (1, 2, 3):
        record = {"pid": 0, "base_url": f"http://127.0.0.1:{8000 + expected}"}
        registry.activate("svc", record)
        assert registry.active("svc")["revision"] == expected
    registry.clear("svc")  # stopped, then released again: still counting
    registry.activate("svc", {"pid": 0, "base_url": "http://127.0.0.1:8009"})
    assert registry.active("svc")["revision"] == 4
    assert [r["revision"] for r in registry.read("svc")["history"]] == [3, 2, 1]


def released(registry: DeploymentRegistry, name: str, sha: str, **extra) -> dict:
    """Record a release of `name` as deploy_model does (no server: the refusals below
    happen before one would start)."""
    record = {"pid": 0, "base_url": "http://127.0.0.1:8001", "checkpoint_sha256": sha,
              "label": f"model-{sha}", "release": {}, **extra}
    registry.activate(name, record)
    return record


def test_a_rollback_with_no_previous_revision_is_refused_naming_it(tmp_path, capsys):
    registry = DeploymentRegistry(tmp_path)
    released(registry, "svc", "a")
    only = cli_here(capsys, "rollback", "svc", state=str(tmp_path))
    assert only.returncode == 1, only.stdout
    assert "quantflow rollback NAME: 'svc' has no previous revision to roll back to (revision 1 is live; " \
        "earlier revisions recorded: none" in only.stderr, only.stderr
    assert "deploy another model with `quantflow run`, or name a revision with --to" in only.stderr
    unknown = cli_here(capsys, "rollback", "nope", state=str(tmp_path))
    assert unknown.returncode == 1 and "no deployment named 'nope' is recorded here (recorded: svc)" in unknown.stderr
    released(registry, "svc", "b")
    for to, says in ((2, "revision 2 of 'svc' is the one live now"),
                     (7, "'svc' has no recorded revision 7 (recorded earlier revisions: 1)")):
        refused = cli_here(capsys, "rollback", "svc", "--to", str(to), state=str(tmp_path))
        assert refused.returncode == 1 and f"quantflow rollback NAME --to: {says}" in refused.stderr, refused.stderr
    assert registry.active("svc")["revision"] == 2  # nothing changed


def test_the_default_target_skips_the_live_checkpoint_and_what_was_rolled_back_from(tmp_path):
    """Two automatic rollbacks in a row never bring back the model the first rolled away from."""
    from quantflow.tasks.rollback import choose_target

    registry = DeploymentRegistry(tmp_path)
    released(registry, "svc", "a")                       # 1
    released(registry, "svc", "b")                       # 2
    assert choose_target(registry.read("svc"), None)["revision"] == 1
    released(registry, "svc", "c")                       # 3, bad
    doc = registry.read("svc")
    assert choose_target(doc, None)["revision"] == 2
    released(registry, "svc", "b")                       # 4: revision 2 brought back
    doc = registry.read("svc")
    doc["history"][0]["rolled_back"] = {"by_revision": 4}  # what rollback_deployment marks on 3
    registry.write("svc", doc)
    # 3 was rolled back from, 2 holds the live checkpoint: 1 is next.
    assert choose_target(registry.read("svc"), None)["revision"] == 1
    assert choose_target(registry.read("svc"), 3)["revision"] == 3  # --to may still name it
    legacy = registry.read("svc")
    del legacy["history"][-1]["release"]  # recorded before releases were kept
    registry.write("svc", legacy)
    with pytest.raises(InputError, match="revision 1 of 'svc' was deployed before quantflow recorded"):
        choose_target(registry.read("svc"), 1)
    with pytest.raises(InputError, match="no previous revision"):
        choose_target(registry.read("svc"), None)


@needs_serving
@pytest.mark.serving
def test_stop_by_name_leaves_the_other_deployment_answering(live_deployment, validated_served, tmp_path):
    from quantflow.monitoring.exporter_process import ensure_exporter, stop_exporter
    from quantflow.tasks.deploy import deploy_model

    v = validated_served
    cfg = v["config"]
    second = deploy_model(cfg.deploy.model_copy(update={"port": free_port_pair()}), v["quantized"],
                          v["validation"], str(tmp_path), "second", monitor=cfg.monitor,
                          golden=v["checkpoint"].golden)
    exporter_port = free_port()
    try:
        metrics = ensure_exporter("127.0.0.1", exporter_port)
        assert {"live", "second"} <= exported_models(metrics)
        listed = cli("deployments", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert {"live", "second"} <= set(rows), rows
        row = rows["second"]
        assert (row["address"], row["scheme"], row["revision"], row["running"]) == (
            second["base_url"], v["quantized"].label, 1, True), row
        assert row["since"] == second["deployed_at"] and "deploy health check" in row["last_health"]
        table = cli("deployments").stdout
        assert table.splitlines()[0].split() == ["name", "model", "scheme", "address", "revision", "since",
                                                 "last_health", "quality_score"], table
        stopped = cli("stop", "second")
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped vLLM server second" in stopped.stdout, stopped.stdout
        assert server_processes(second["pid"]) == []
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{second['base_url']}/health", timeout=5)
        assert "second" not in {r["name"] for r in json.loads(cli("deployments", "--json").stdout)}
        # The running exporter's next scrape no longer has its series, and still has the other's.
        models = exported_models(metrics)
        assert "second" not in models and "live" in models, models
        # The other deployment, its server and its address, kept serving.
        live = live_deployment
        assert complete(live["base_url"], live["served_model_name"], "evaluated when the", 4, live["key"])
        assert DeploymentRegistry().active("live")["pid"] == live["pid"]
    finally:
        stop_exporter(exporter_port)
        stop_deployment("second")


def exported_models(url: str) -> set[str]:
    return {s.labels["model"] for s in scrape(url)["llm_quality_regression_alerts"]}


def test_a_revision_whose_checkpoint_is_gone_is_refused_and_the_live_one_left(tmp_path):
    """The earlier revision's folder was deleted since: the deploy stage's own check refuses
    it before any server starts, and the registry still names revision 2 as live."""
    from quantflow.storage.manifests import QuantizedManifest
    from quantflow.tasks.rollback import rollback_deployment

    gone = QuantizedManifest(uri=str(tmp_path / "gone" / "quantized_model"), files={"model.safetensors": "0" * 64},
                             label="rtn-w4a16-g128", method="rtn", entry_point="model_free_ptq", recipe=None,
                             quantization_format="pack-quantized", size_bytes=1, baseline_size_bytes=4)
    registry = DeploymentRegistry(tmp_path / "state")
    released(registry, "svc", "a", output_uri=str(tmp_path / "gone"),
             release={"deploy": {}, "quantized": gone.model_dump(mode="json"), "validation": None, "golden": []})
    released(registry, "svc", "b")
    with pytest.raises(StageError) as refused:
        rollback_deployment("svc", registry=registry)
    assert str(refused.value).startswith(
        "[rollback] revision 1 of 'svc' could not be brought back; revision 2 is left as it was. "
        f"quantized checkpoint {gone.uri} is missing"), refused.value
    assert registry.active("svc")["revision"] == 2 and not registry.read("svc")["history"][0].get("rolled_back")

