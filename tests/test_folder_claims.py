"""Two runs with different settings never mix their files in one output folder (issue 12,
item 4): the second is refused while the first holds the folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from quantflow.config import build_config
from quantflow.storage.folder_claims import CLAIMS, FolderInUse, claim_output


def _cfg(tmp_path: Path, **quant) -> object:
    data = yaml.safe_load(Path("configs/demo.yaml").read_text())
    data["output_dir"] = str(tmp_path / "out")
    data["quant"] = {**data["quant"], **quant}
    return build_config(data, {})


def test_claims_refuse_other_settings_admit_identical_ones_and_ignore_dead_runs(tmp_path):
    first = _cfg(tmp_path, method="gptq", bits=4, group_size=128)
    other = _cfg(tmp_path, method="rtn", bits=8, group_size=-1)
    uri = first.output_uri
    with claim_output(first, uri):
        with claim_output(first.model_copy(update={"name": "same-settings"}), uri):
            pass  # identical settings share the folder: the stage locks keep them apart
        with pytest.raises(FolderInUse, match=r"output_dir .* is in use by run 'demo' .* with other "
                                              r"settings.*\n  fix: wait for that run to finish"):
            with claim_output(other, uri):
                pytest.fail("entered a folder held by other settings")
        assert len(list((Path(uri) / CLAIMS).glob("*.json"))) == 1  # the refused run left nothing
    assert list((Path(uri) / CLAIMS).glob("*.json")) == []

    # A run killed with -9 leaves its claim; on this host a dead pid no longer holds the folder.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = Path(uri) / CLAIMS / f"{socket.gethostname()}-{dead.stdout.strip()}-0.json"
    stale.write_text(json.dumps({"digest": "x", "run": "killed", "host": socket.gethostname(),
                                 "pid": int(dead.stdout), "time": time.time() - 5}))
    with claim_output(other, uri):
        assert not stale.exists()


@pytest.mark.slow
def test_a_run_with_other_settings_is_refused_while_the_folder_is_in_use(prefect_server, config_factory,
                                                                       tmp_path):
    """A GPTQ run is working in the folder; an RTN run started there meanwhile exits 1
    naming output_dir and writes nothing; the GPTQ run completes with its own summary."""
    gptq = config_factory(quant={"method": "gptq", "bits": 4, "group_size": 128}, deploy={"enabled": False},
                          validation={"lm_eval": {"enabled": False}})
    out = Path(gptq.output_uri)
    path = tmp_path / "gptq.yaml"
    path.write_text(yaml.safe_dump(gptq.model_dump(mode="json")))
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    cmd = [sys.executable, "-m", "quantflow.cli", "run", "--config", str(path)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not list((out / CLAIMS).glob("*.json")):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never claimed its folder"
            time.sleep(0.2)
        second = subprocess.run([*cmd, "--method", "rtn", "--bits", "8", "--group-size", "-1",
                                 "--name", "intruder"], capture_output=True, text=True, env=env,
                                timeout=300)
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"output_dir {out} is in use by run '{gptq.name}'" in second.stderr, second.stderr[-2000:]
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-2000:]
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert summary["name"] == gptq.name and summary["method"] == gptq.quant.label
    assert summary["outcome"] == "validated"
    report = json.loads((out / "validation_report.json").read_text())
    assert report["label"] == gptq.quant.label
    assert list((out / CLAIMS).glob("*.json")) == []
