"""Stage 1 on the demo model: integrity, architecture summary, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from quantflow.config import ModelSpec, ValidationConfig
from quantflow.errors import StageError
from quantflow.storage.hashing import file_sha256
from quantflow.tasks.checkpoint import prepare_checkpoint


@pytest.fixture
def quick_validation(demo_dir):
    return ValidationConfig.model_validate({
        "perplexity": {"source": {"dataset": str(demo_dir / "data" / "heldout.jsonl")},
                       "window": 128, "max_tokens": 512},
        "consistency": {"enabled": False}})


def test_checkpoint_summary_and_baseline(demo_model, quick_validation, tmp_path):
    m = prepare_checkpoint(ModelSpec(id=str(demo_model)), quick_validation, str(tmp_path))
    arch = m.architecture
    assert arch["params"] == 3_541_248  # 4 layers x 256 hidden, vocab 512, tied embeddings
    assert (arch["layers"], arch["hidden_size"], arch["attention_heads"], arch["vocab_size"]) == (4, 256, 4, 512)
    assert m.shards == {"model.safetensors": file_sha256(demo_model / "model.safetensors")}
    doc = json.loads((tmp_path / "baseline_metrics.json").read_text())
    assert doc["shards"] == m.shards
    ppl = doc["metrics"]["perplexity"]
    assert ppl["tokens"] == 512 and 5 < ppl["perplexity"] < 40


def _copy(demo_model, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(demo_model, broken)
    return broken


def test_truncated_shard_is_a_clear_error(demo_model, quick_validation, tmp_path):
    broken = _copy(demo_model, tmp_path)
    shard = broken / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(StageError) as err:
        prepare_checkpoint(ModelSpec(id=str(broken)), quick_validation, str(tmp_path / "out"))
    assert err.value.stage == "checkpoint"
    assert "model.safetensors is truncated" in str(err.value)
    assert not (tmp_path / "out" / "baseline_metrics.json").exists()


def test_garbled_shard_header_is_a_clear_error(demo_model, quick_validation, tmp_path):
    broken = _copy(demo_model, tmp_path)
    shard = broken / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    with pytest.raises(StageError, match="model.safetensors is corrupt: its header is not valid JSON"):
        prepare_checkpoint(ModelSpec(id=str(broken)), quick_validation, str(tmp_path / "out"))


def test_missing_shard_named_in_index(demo_model, quick_validation, tmp_path):
    broken = _copy(demo_model, tmp_path)
    (broken / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(StageError, match="model-00002-of-00002.safetensors"):
        prepare_checkpoint(ModelSpec(id=str(broken)), quick_validation, str(tmp_path / "out"))


def test_nonexistent_local_model(quick_validation, tmp_path):
    with pytest.raises(StageError) as err:
        prepare_checkpoint(ModelSpec(id="./no/such/model"), quick_validation, str(tmp_path))
    assert err.value.stage == "checkpoint" and "does not exist" in str(err.value)


def test_unknown_hub_id_offline(quick_validation, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StageError) as err:
        prepare_checkpoint(ModelSpec(id="no-such-org/no-such-model"), quick_validation, str(tmp_path))
    assert "not in the hub cache" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)


def test_later_stages_refuse_a_checkpoint_changed_after_stage_one(demo_model, quick_validation, tmp_path):
    """Stage 1 verified these shards; an edit afterwards, same size, same path, is refused by
    the stage that would read it, naming the file."""
    from safetensors.torch import load_file, save_file

    from quantflow.storage.artifacts import local_checkpoint

    model = _copy(demo_model, tmp_path)
    m = prepare_checkpoint(ModelSpec(id=str(model)), quick_validation, str(tmp_path / "out"))
    assert local_checkpoint(m, "quantize") == model  # unchanged: accepted
    shard = model / "model.safetensors"
    size = shard.stat().st_size
    tensors = load_file(shard)
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, shard, metadata={"format": "pt"})
    assert shard.stat().st_size == size  # what a size check alone would miss
    with pytest.raises(StageError) as err:
        local_checkpoint(m, "quantize")
    assert err.value.stage == "quantize"
    assert "changed: model.safetensors" in str(err.value) and str(model) in str(err.value)
    shard.unlink()
    with pytest.raises(StageError, match="missing: model.safetensors"):
        local_checkpoint(m, "validate")
