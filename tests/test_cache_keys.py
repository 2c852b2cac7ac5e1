"""Cache keys follow the content of local inputs, not their paths (issue 12, item 0).

Each pipeline test runs the demo config on private copies of the demo's data files, edits
one file in place (same path) and runs again: the stages that read it recompute, the
others stay cached. A path-keyed cache would report every stage as cached and judge the
model on data it was never evaluated with.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from quantflow.storage import content_digest
from quantflow.storage.content_digest import path_digest, task_folder_digest
from quantflow.flows.pipeline import GATE_STATE, quantize_pipeline

slow = pytest.mark.slow  # the pipeline tests; the memo test is fast
ALL = ["calibration", "checkpoint", "quantize", "validate"]
# Round-to-nearest as a user recipe: a second per quantize run, where GPTQ takes ten.
RECIPE = """quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        all: {targets: [Linear], weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}}
"""


@pytest.fixture
def inputs(tmp_path, demo_dir) -> dict[str, Path]:
    """The demo's data sets, task folder and recipe, copied so a test may edit them."""
    from quantflow.demo.assets import write_tasks

    data = tmp_path / "data"
    shutil.copytree(demo_dir / "data", data)
    # Task YAMLs name their data files by absolute path, outside the task folder (as the
    # demo's do): editing mc.jsonl must still change the folder's key.
    write_tasks(data, tmp_path / "tasks")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    return {"calibration": data / "calibration.jsonl", "heldout": data / "heldout.jsonl",
            "mc": data / "mc.jsonl", "tasks": tmp_path / "tasks", "recipe": recipe}


def config(config_factory, inputs, lm_eval: bool = False, **overrides):
    return config_factory(overrides={
        "calibration.source.dataset": str(inputs["calibration"]),
        "validation.perplexity.source.dataset": str(inputs["heldout"]),
        "validation.lm_eval.include_path": str(inputs["tasks"]),
        "validation.lm_eval.enabled": lm_eval, "deploy.enabled": False,
        "calibration.num_samples": 16, **overrides})  # demo: 64; GPTQ takes twice as long


def run(cfg) -> dict:
    state = quantize_pipeline(config=cfg, return_state=True)
    # The verdict is not under test here; a rejection still ran (or reused) every stage.
    assert state.is_completed() or state.name == GATE_STATE, state.message
    return json.loads((Path(cfg.output_uri) / "pipeline_summary.json").read_text())


def recomputed(summary: dict) -> list[str]:
    return sorted(set(summary["stages"]) - set(summary["cache_hits"]))


def read(cfg, name: str) -> dict:
    return json.loads((Path(cfg.output_uri) / name).read_text())


@slow
def test_calibration_file_content_is_in_the_key(prefect_server, config_factory, inputs):
    cfg = config(config_factory, inputs)
    assert run(cfg)["cache_hits"] == []
    assert run(cfg)["cache_hits"] == ALL  # unchanged content: everything is reused
    tensor = (Path(cfg.output_uri) / "calibration_data.pt").read_bytes()

    lines = inputs["calibration"].read_text().splitlines(keepends=True)
    inputs["calibration"].write_text("".join(reversed(lines)))  # same size, same path
    summary = run(cfg)
    assert summary["cache_hits"] == ["checkpoint"]
    assert recomputed(summary) == ["calibration", "quantize", "validate"]
    assert (Path(cfg.output_uri) / "calibration_data.pt").read_bytes() != tensor


@slow
def test_heldout_file_content_is_in_the_key(prefect_server, config_factory, inputs):
    cfg = config(config_factory, inputs)
    run(cfg)
    tokens = next(c["tokens"] for c in read(cfg, "validation_report.json")["checks"]
                  if c["check"] == "perplexity")

    original = inputs["heldout"].read_text()
    lines = original.splitlines(keepends=True)
    inputs["heldout"].write_text("".join(lines[: len(lines) // 3]))
    summary = run(cfg)
    assert summary["cache_hits"] == ["calibration", "quantize"]
    assert recomputed(summary) == ["checkpoint", "validate"]
    report = read(cfg, "validation_report.json")
    ppl = next(c for c in report["checks"] if c["check"] == "perplexity")
    assert ppl["tokens"] < tokens / 2  # both models were scored on the shortened text
    assert read(cfg, "baseline_metrics.json")["metrics"]["perplexity"]["tokens"] == ppl["tokens"]

    # Back to the original text: its cached baseline describes files the shortened run has
    # since overwritten in this folder, so it is measured again, never compared stale.
    inputs["heldout"].write_text(original)
    summary = run(cfg)
    assert "checkpoint" in recomputed(summary)
    baseline = read(cfg, "baseline_metrics.json")["metrics"]["perplexity"]
    report = read(cfg, "validation_report.json")
    ppl = next(c for c in report["checks"] if c["check"] == "perplexity")
    assert baseline["tokens"] == ppl["tokens"] == tokens


@slow
def test_lm_eval_task_data_is_in_the_key(prefect_server, config_factory, inputs):
    # Fewer examples than the demo keeps the two lm-eval runs per pipeline run short.
    cfg = config(config_factory, inputs, lm_eval=True, **{"validation.lm_eval.limit": 40})
    run(cfg)
    before = read(cfg, "baseline_metrics.json")["metrics"]["lm_eval"]["demo_mc"]

    # Every gold answer moved to another choice: accuracy against it must change.
    rows = [json.loads(line) for line in inputs["mc"].read_text().splitlines()]
    moved = [{**r, "label": (r["label"] + 1) % len(r["choices"])} for r in rows]
    inputs["mc"].write_text("".join(json.dumps(r) + "\n" for r in moved))
    summary = run(cfg)
    assert summary["cache_hits"] == ["calibration", "quantize"]
    assert recomputed(summary) == ["checkpoint", "validate"]
    after = read(cfg, "baseline_metrics.json")["metrics"]["lm_eval"]["demo_mc"]
    assert after["acc,none"] != before["acc,none"]


@slow
def test_recipe_file_content_is_in_the_key(prefect_server, config_factory, inputs):
    cfg = config(config_factory, inputs,
                 **{"quant.method": "recipe", "quant.recipe": str(inputs["recipe"])})
    run(cfg)
    recipe = inputs["recipe"]
    recipe.write_text(recipe.read_text().replace("num_bits: 8", "num_bits: 4"))
    summary = run(cfg)
    assert summary["cache_hits"] == ["calibration", "checkpoint"]
    assert recomputed(summary) == ["quantize", "validate"]
    groups = read(cfg, "quantized_model/config.json")["quantization_config"]["config_groups"]
    assert {g["weights"]["num_bits"] for g in groups.values()} == {4}


def _age(path: Path, seconds: float) -> int:
    """Set mtime in the past: files modified in the last two seconds are never memoized."""
    t = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(t, t))
    return t


def test_digest_memo_rereads_only_changed_files(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTFLOW_CACHE", str(tmp_path / "cache"))
    reads: list[Path] = []
    real = content_digest.file_sha256
    monkeypatch.setattr(content_digest, "file_sha256", lambda p: reads.append(p) or real(p))

    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "a"}\n')
    _age(f, 100)
    first = path_digest(f)
    assert first == hashlib.sha256(f.read_bytes()).hexdigest() and len(reads) == 1
    memo = json.loads((tmp_path / "cache" / content_digest.MEMO_NAME).read_text())
    assert memo[str(f)]["sha256"] == first
    assert path_digest(f) == first and len(reads) == 1  # from the memo file: not read again

    f.write_text('{"text": "b"}\n')  # same size, new bytes, new mtime
    mtime = _age(f, 50)
    assert path_digest(f) != first and len(reads) == 2
    time.sleep(0.05)  # ctime advances with the kernel's coarse clock (a few ms per tick)
    f.write_text('{"text": "a"}\n')
    os.utime(f, ns=(mtime, mtime))  # size and mtime as last hashed (cp -p, rsync -t): ctime moved
    assert path_digest(f) == first and len(reads) == 3

    fresh = tmp_path / "fresh.txt"
    fresh.write_text("just written")
    path_digest(fresh)
    path_digest(fresh)
    assert len(reads) == 5  # too recent to trust its mtime: hashed every time, never stale

    # Folders: every file by relative path; __pycache__ (written by lm-eval importing a
    # task folder's utils.py) does not count.
    tasks = tmp_path / "tasks"
    (tasks / "sub").mkdir(parents=True)
    (tasks / "sub" / "t.yaml").write_text(f"task: t\ndataset_kwargs:\n  data_files:\n    test: {f}\n")
    folder = task_folder_digest(tasks)
    (tasks / "__pycache__").mkdir()
    (tasks / "__pycache__" / "utils.cpython-311.pyc").write_bytes(b"\0")
    assert task_folder_digest(tasks) == folder
    f.write_text('{"text": "c"}\n')  # data outside the folder, named by a task YAML
    outside = task_folder_digest(tasks)
    assert outside != folder
    (tasks / "sub" / "t.yaml").write_text((tasks / "sub" / "t.yaml").read_text() + "num_fewshot: 1\n")
    assert task_folder_digest(tasks) not in (folder, outside)



def test_requantize_trigger_follows_data_content_not_timestamps(tmp_path):
    """The nightly requantize flow's data fingerprint: a touch alone is no change; an edit
    with its size and mtime restored is one."""
    import os

    from quantflow.config import TextSource
    from quantflow.flows.requantize import data_fingerprint

    data = tmp_path / "calibration.jsonl"
    data.write_text('{"text": "abc"}\n')
    source = TextSource(dataset=str(data))
    before = data_fingerprint(source)
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert data_fingerprint(source) == before
    st = data.stat()
    data.write_text('{"text": "xyz"}\n')
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data_fingerprint(source) != before
