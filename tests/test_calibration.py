"""Stage 2: seeded, validated token samples."""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

from quantflow.config import CalibrationConfig, ModelSpec, ValidationConfig
from quantflow.errors import StageError
from quantflow.tasks.calibration import build_calibration
from quantflow.tasks.checkpoint import prepare_checkpoint


@pytest.fixture(scope="module")
def checkpoint(demo_dir, tmp_path_factory):
    v = ValidationConfig.model_validate({
        "perplexity": {"enabled": False}, "consistency": {"enabled": False}})
    return prepare_checkpoint(ModelSpec(id=str(demo_dir / "model")), v,
                              str(tmp_path_factory.mktemp("ckpt")))


def _cfg(source, **kw):
    return CalibrationConfig.model_validate({"source": {"dataset": str(source)}, "num_samples": 16,
                                             "seq_len": 64, **kw})


def _ids(path):
    return torch.load(io.BytesIO((path / "calibration_data.pt").read_bytes()))["input_ids"]


def test_samples_have_shape_range_and_are_seeded(checkpoint, demo_dir, tmp_path):
    src = demo_dir / "data" / "calibration.jsonl"
    a = build_calibration(_cfg(src), checkpoint, str(tmp_path / "a"))
    b = build_calibration(_cfg(src), checkpoint, str(tmp_path / "b"))
    c = build_calibration(_cfg(src, seed=7), checkpoint, str(tmp_path / "c"))
    ids = _ids(tmp_path / "a")
    assert ids.shape == (16, 64) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 512
    assert torch.equal(ids, _ids(tmp_path / "b")) and a.sha256 == b.sha256
    assert not torch.equal(ids, _ids(tmp_path / "c")) and a.sha256 != c.sha256
    assert a.warnings == [] and a.stats["unique_token_ratio"] > 0.1
    manifest = json.loads((tmp_path / "a" / "calibration_manifest.json").read_text())
    assert manifest["sha256"] == a.sha256


def test_repetitive_text_warns_about_diversity(checkpoint, tmp_path, caplog):
    src = tmp_path / "same.txt"
    src.write_text("the the the the the the the the\n" * 200)
    with caplog.at_level(logging.WARNING, logger="quantflow.calibration"):
        m = build_calibration(_cfg(src), checkpoint, str(tmp_path / "out"))
    assert any("low diversity" in w for w in m.warnings)
    assert "low diversity" in caplog.text


def test_too_little_text_is_an_error(checkpoint, tmp_path):
    src = tmp_path / "short.txt"
    src.write_text("a few words only")
    with pytest.raises(StageError, match="fewer than one sample of calibration.seq_len=64"):
        build_calibration(_cfg(src), checkpoint, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "calibration_data.pt").exists()


def test_missing_text_field_names_the_field(checkpoint, tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(StageError, match="calibration.source.text_field"):
        build_calibration(_cfg(src), checkpoint, str(tmp_path / "out"))


def test_token_ids_outside_the_vocabulary_are_refused(checkpoint, demo_dir, tmp_path):
    small_vocab = checkpoint.model_copy(update={"architecture": {**checkpoint.architecture, "vocab_size": 100}})
    with pytest.raises(StageError, match="tokenizer and model do not match"):
        build_calibration(_cfg(demo_dir / "data" / "calibration.jsonl"), small_vocab, str(tmp_path / "o"))
