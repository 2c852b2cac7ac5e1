"""kill -9 of `quantflow run` inside each stage, then the same run again.

The killed run is the CLI process, started in its own session; the whole session is
killed (`os.killpg`), as a container stop or the OOM killer of a cgroup would. The stages
run in threads of the CLI process, so this is also the kill of every stage; the only
processes that must survive are those quantflow starts detached on purpose (vLLM servers,
in their own sessions), and those are what the deploy test looks for.

Where the run is, is read from outside, without hooks in the product: the CLI's log lines,
the markers in the output folder, and the process table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import needs_serving
from helpers import complete, stop_deployment, vllm_serving
from quantflow.storage.artifacts import load_calibration, marker
from quantflow.storage.manifests import CalibrationManifest
from quantflow.processes import group_members
from quantflow.serving.registry import DeploymentRegistry
from quantflow.storage.hashing import digest_of, tree_sha256
from quantflow.storage.store import ArtifactStore

pytestmark = [pytest.mark.slow]

STAGES = ["checkpoint", "calibration", "quantize", "validate"]
# Perplexity (on the first 2048 held-out tokens) and KL only: lm-eval and the full held-out
# set are covered by their own tests, and every second here is paid ten times.
VALIDATION = {"perplexity": {"source": {"dataset": ".cache/demo/data/heldout.jsonl"}, "window": 128,
                             "max_tokens": 2048},
              "lm_eval": {"enabled": False}}
WAIT_S = 600  # a generous bound for a slow shared CI host; never a timing assertion


class Run:
    """One `quantflow run --config FILE` in its own session, its output in a log file."""

    def __init__(self, cfg, tmp_path: Path, prefect_server: str, deploy: bool):
        self.cfg = cfg
        self.out = Path(cfg.output_uri)
        self.config_path = tmp_path / f"{cfg.name}.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        self.args = [sys.executable, "-m", "quantflow.cli", "run", "--config", str(self.config_path),
                     *([] if deploy else ["--no-deploy"])]
        # llm-compressor's own INFO lines show when oneshot is running.
        # Its own result storage: a stage's result appearing there means the stage committed.
        self.results = tmp_path / "results"
        self.env = {**os.environ, "PREFECT_API_URL": prefect_server, "LLM_COMPRESSOR_LOG_LEVEL": "INFO",
                    "PREFECT_LOCAL_STORAGE_PATH": str(self.results)}
        self.log = tmp_path / f"{cfg.name}-killed.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{what} did not happen within {WAIT_S}s:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert self.proc.returncode == -signal.SIGKILL
        assert group_members(self.proc.pid) == []  # nothing of the killed session is left

    def rerun(self) -> dict:
        done = subprocess.run(self.args, capture_output=True, text=True, env=self.env, timeout=WAIT_S)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads((self.out / "pipeline_summary.json").read_text())

    def committed(self) -> int:
        """How many stage results Prefect has persisted (each is written as its stage ends)."""
        return len(list(self.results.iterdir())) if self.results.is_dir() else 0

    def has_marker(self, stage: str) -> bool:
        return (self.out / marker(stage)).exists()


def crash_and_rerun(run: Run, stage: str, inside: Callable[[], bool]) -> dict:
    """Kill the run once `inside()` says it is in `stage`, check what the kill left, rerun."""
    before = STAGES[:STAGES.index(stage)] if stage in STAGES else STAGES
    run.start()
    run.wait_for(f"the run reached {stage}", inside)
    run.kill()
    # Earlier stages finished; the interrupted one left no marker, so nothing of it counts.
    assert [s for s in STAGES if run.has_marker(s)] == before, run.text()[-3000:]
    assert not (run.out / "pipeline_summary.json").exists()  # the killed run never got that far
    summary = run.rerun()
    assert summary["verdict"] == "pass"
    assert summary["outcome"] == ("deployed" if stage == "deploy" else "validated")
    assert summary["cache_hits"] == sorted(before), summary["stages"]
    if stage in STAGES:
        assert summary["stages"][stage]["cache_hit"] is False
    assert [s for s in STAGES if run.has_marker(s)] == STAGES
    check_outputs(run.out)
    return summary


def check_outputs(out: Path) -> None:
    """Every output agrees with the manifest that describes it, and no temporary file,
    staging or build folder is left in the output folder."""
    leftovers = [p.relative_to(out).as_posix() for p in out.rglob(".*")]
    assert leftovers == [], leftovers
    calibration = CalibrationManifest.model_validate_json((out / "calibration_manifest.json").read_text())
    ids = load_calibration(calibration, "test")  # refuses token ids that differ from the manifest
    assert tuple(ids.shape) == (calibration.num_samples, calibration.seq_len)
    store = ArtifactStore(str(out))
    assert store.read_json(marker("calibration"))["key"] == calibration.outputs_key()
    report = json.loads((out / "validation_report.json").read_text())
    # The report names the digest of the quantized files it validated: the files on disk.
    assert report["checkpoint_sha256"] == digest_of(tree_sha256(out / "quantized_model"))
    assert report["overall_pass"]


def logged(run: Run, text: str) -> Callable[[], bool]:
    return lambda: text in run.text()


def stray_processes(out: Path) -> list[int]:
    """Processes other than this one whose command line or open files name the output folder."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != os.getpid() and any(str(out) in part for part in p.info["cmdline"] or []):
            found.append(p.info["pid"])
    return found


@pytest.fixture
def crash_run(prefect_server, config_factory, tmp_path, request):
    def make(deploy: bool = False, **sections) -> Run:
        sections.setdefault("validation", VALIDATION)
        # Unique on this machine: the process table is searched by served model name.
        name = f"{request.node.name.removeprefix('test_')}-{os.getpid()}".replace("_", "-")
        return Run(config_factory(name, **sections), tmp_path, prefect_server, deploy)

    return make


def test_kill_during_checkpoint(crash_run):
    run = crash_run()
    # Logged once the shards are hashed: the model load and baseline evaluation follow.
    crash_and_rerun(run, "checkpoint", logged(run, ": hashing 1 shard(s)"))
    assert stray_processes(run.out) == []


def test_kill_during_calibration(crash_run, tmp_path):
    """Calibration takes ~0.2 s on the demo data (24 kB of text), too short to aim inside.
    Here it reads a 150 MB calibration file (the demo text, numbered, 6000 times): hashing it
    for the cache key and parsing it keep the stage busy for over a second after stage 1's
    result is committed, which is when the kill comes."""
    lines = [json.loads(line)["text"] for line in
             Path(".cache/demo/data/calibration.jsonl").read_text().splitlines() if line.strip()]
    big = tmp_path / "calibration-large.jsonl"
    with big.open("w") as fh:
        for i in range(6000):
            fh.writelines(json.dumps({"text": f"{i} {text}"}) + "\n" for text in lines)
    run = crash_run(calibration={"source": {"dataset": str(big)}})
    crash_and_rerun(run, "calibration", lambda: run.committed() >= 1)
    assert stray_processes(run.out) == []


def test_kill_inside_oneshot(crash_run):
    run = crash_run()
    # llm-compressor's GPTQ modifier logs this per batch of layers, inside oneshot.
    crash_and_rerun(run, "quantize", logged(run, "module(s): "))
    assert stray_processes(run.out) == []


def test_kill_during_validate(crash_run):
    run = crash_run()
    crash_and_rerun(run, "validate", logged(run, "quantized: perplexity (window"))
    assert stray_processes(run.out) == []


@needs_serving
@pytest.mark.serving
def test_kill_while_vllm_starts(crash_run):
    """The killed rollout's vLLM keeps starting (it is detached on purpose, so a deployment
    outlives the CLI) with no deployment record; the next deploy of the name stops it."""
    run = crash_run(deploy=True)
    name = run.cfg.name
    registry = DeploymentRegistry()
    orphans: list[int] = []
    try:
        def vllm_starting() -> bool:
            orphans[:] = vllm_serving(name)
            return bool(orphans)

        run.start()
        run.wait_for("a vLLM server started", vllm_starting)
        run.kill()
        assert registry.active(name) is None  # killed before the server was recorded
        starting = registry.read(name)["starting"]
        assert [e["owner_pid"] for e in starting] == [run.proc.pid]
        assert vllm_serving(name) == orphans  # the orphan is there, and still starting

        summary = run.rerun()
        assert summary["cache_hits"] == sorted(STAGES)
        doc = registry.read(name)
        live = doc["active"]
        assert doc["starting"] == []
        assert live and vllm_serving(name) == [live["pid"]]
        for pid in orphans:
            assert group_members(pid) == [], f"the killed rollout's server (pid {pid}) still runs"
        deployment = json.loads((run.out / "deployment.json").read_text())
        assert deployment["pid"] == live["pid"]
        text = complete(live["base_url"], live["served_model_name"], run.cfg.deploy.health.prompt, 4)
        assert text.strip()
        check_outputs(run.out)
    finally:
        stop_deployment(name)
        for pid in orphans:  # never leave the orphan behind, even when the test fails
            if group_members(pid):
                os.killpg(pid, signal.SIGKILL)
