"""Stage 3: every scheme family through the pipeline gives exactly the tensors a direct
llm-compressor call with the same recipe and the same calibration samples gives."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantflow.config import CalibrationConfig, ModelSpec, QuantConfig, ValidationConfig
from quantflow.errors import StageError
from quantflow.quantization import cpu_pinning
from quantflow.tasks.calibration import build_calibration
from quantflow.tasks.checkpoint import prepare_checkpoint
from quantflow.tasks.quantize import quantize_model

# Recipes written by hand, the way a user of llm-compressor would: the pipeline's
# translation of quant.* must produce the same tensors.
DIRECT_RECIPES = {
    "gptq": "GPTQModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}",
    "awq": ("AWQModifier: {duo_scaling: true}\n"
            "    QuantizationModifier: {targets: [Linear], scheme: W4A16_ASYM, ignore: [lm_head]}"),
    "w8a8": ("SmoothQuantModifier: {smoothing_strength: 0.8}\n"
             "    GPTQModifier: {targets: [Linear], scheme: W8A8, ignore: [lm_head]}"),
    "fp8-static": "QuantizationModifier: {targets: [Linear], scheme: FP8, ignore: [lm_head]}",
    "fp8-dynamic": "QuantizationModifier: {targets: [Linear], scheme: FP8_DYNAMIC, ignore: [lm_head]}",
    "rtn": "QuantizationModifier: {targets: [Linear], scheme: W4A16, ignore: [lm_head]}",
}
PIPELINE_CONFIGS = {
    "gptq": {"method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": True},
    "w8a8": {"method": "w8a8", "smoothing_strength": 0.8},
    "fp8-static": {"method": "fp8", "fp8_scheme": "static"},
    "fp8-dynamic": {"method": "fp8", "fp8_scheme": "dynamic"},
    "rtn": {"method": "rtn", "bits": 4, "group_size": 128},
}


@pytest.fixture(scope="module")
def stage_inputs(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inputs")
    v = ValidationConfig.model_validate({"perplexity": {"enabled": False},
                                         "consistency": {"enabled": False}})
    ckpt = prepare_checkpoint(ModelSpec(id=str(demo_dir / "model")), v, str(out))
    cal = build_calibration(CalibrationConfig.model_validate({
        "source": {"dataset": str(demo_dir / "data" / "calibration.jsonl")},
        "num_samples": 16, "seq_len": 64}), ckpt, str(out))
    return ckpt, cal


def direct_llmcompressor(model_dir: Path, recipe_body: str, ids: torch.Tensor | None, out: Path) -> None:
    """What a user would write: oneshot with the recipe and the same samples, in order."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    recipe = f"quant_stage:\n  quant_modifiers:\n    {recipe_body}\n"
    kwargs = {}
    if ids is not None:
        kwargs = dict(dataset=Dataset.from_dict({"input_ids": ids.tolist(),
                                                 "attention_mask": torch.ones_like(ids).tolist()}),
                      num_calibration_samples=len(ids), max_seq_length=ids.shape[1],
                      shuffle_calibration_samples=False)
    oneshot(model=model, tokenizer=tok, recipe=recipe, **kwargs)
    model.save_pretrained(out, save_compressed=True)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(PIPELINE_CONFIGS))
def test_pipeline_equals_direct_llmcompressor(family, stage_inputs, demo_dir, tmp_path):
    ckpt, cal = stage_inputs
    quant = QuantConfig.model_validate(PIPELINE_CONFIGS[family])
    m = quantize_model(quant, ckpt, cal if quant.needs_calibration else None, str(tmp_path / "run"))
    ids = torch.load(io.BytesIO(Path(cal.uri).read_bytes()))["input_ids"] if quant.needs_calibration else None
    if family == "awq":
        cpu_pinning.apply()
    direct_llmcompressor(demo_dir / "model", DIRECT_RECIPES[family], ids, tmp_path / "direct")
    ours, theirs = tensors(Path(m.uri)), tensors(tmp_path / "direct")
    assert sorted(ours) == sorted(theirs)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"
    qcfg = json.loads((Path(m.uri) / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert m.size_bytes < m.baseline_size_bytes


@pytest.mark.slow
@pytest.mark.parametrize("quant", [
    {"method": "gptq", "bits": 3, "group_size": 64, "actorder": None},
    {"method": "gptq", "bits": 8, "group_size": -1, "sym": False},
    {"method": "rtn", "bits": 2, "group_size": 32},
    {"method": "w8a16"}, {"method": "nvfp4"}, {"method": "mxfp4"}, {"method": "fp8", "fp8_scheme": "block"},
])
def test_other_schemes_save_a_checkpoint(quant, stage_inputs, tmp_path):
    ckpt, cal = stage_inputs
    q = QuantConfig.model_validate(quant)
    m = quantize_model(q, ckpt, cal if q.needs_calibration else None, str(tmp_path))
    cfg = json.loads((Path(m.uri) / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert m.files and all(len(h) == 64 for h in m.files.values())
    assert not list(tmp_path.glob(".quantized_model.build-*"))  # no scratch left behind


def test_awq_shim_is_narrow():
    """The CPU shim exists only where pinning cannot work, and only skips pinning."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    active = cpu_pinning.apply()
    assert active == (not torch.accelerator.is_available())
    if active:
        class Holder:
            value = torch.zeros(2)
        holder = Holder()
        IntermediatesCache._pin_intermediate(holder)
        assert not holder.value.is_pinned()  # skipped instead of raising


def test_cuda_requested_without_gpu_is_refused_before_loading(stage_inputs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal only applies without one")
    ckpt, cal = stage_inputs
    with pytest.raises(StageError, match="quant.device is 'cuda' but this machine has no usable GPU"):
        quantize_model(QuantConfig(method="gptq", device="cuda"), ckpt, cal, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    import yaml

    from quantflow.config import load_config
    from quantflow.config.search import load_search_config
    from quantflow.errors import ConfigError

    if "search" in yaml.safe_load(Path(path).read_text()):
        cfg = load_search_config(path)
        assert [n for n, _ in cfg.search.named()]
        with pytest.raises(ConfigError, match="quantflow search --config"):
            load_config(path)  # `quantflow run` with a search config says what to run instead
    else:
        cfg = load_config(path)
    assert cfg.quant.label


def test_recipe_method_runs_a_recipe_file_unchanged(stage_inputs, tmp_path):
    ckpt, cal = stage_inputs
    m = quantize_model(QuantConfig(method="recipe", recipe="configs/recipes/w4a16-mixed.yaml"),
                       ckpt, cal, str(tmp_path))
    groups = json.loads((Path(m.uri) / "config.json").read_text())["quantization_config"]["config_groups"]
    bits = {tuple(g["targets"]): g["weights"]["num_bits"] for g in groups.values()}
    assert bits == {("re:.*down_proj$",): 8, ("Linear",): 4}
    t = tensors(Path(m.uri))
    # int32 packing: 768 inputs at 8 bits = 192 words per row, 256 inputs at 4 bits = 32.
    assert tuple(t["model.layers.0.mlp.down_proj.weight_packed"].shape) == (256, 192)
    assert tuple(t["model.layers.0.mlp.down_proj.weight_scale"].shape) == (256, 1)  # per channel
    assert tuple(t["model.layers.0.mlp.up_proj.weight_packed"].shape) == (768, 32)
    assert tuple(t["model.layers.0.mlp.up_proj.weight_scale"].shape) == (768, 2)  # groups of 128
    assert (Path(m.uri) / "quantflow_recipe.yaml").read_text() == Path("configs/recipes/w4a16-mixed.yaml").read_text()


def test_ignored_layers_stay_in_full_precision(stage_inputs, tmp_path):
    ckpt, cal = stage_inputs
    q = QuantConfig(method="gptq", ignore=["lm_head", r"re:.*layers\.0\..*", r"re:.*layers\.3\..*"])
    t = tensors(Path(quantize_model(q, ckpt, cal, str(tmp_path)).uri))
    for layer in (0, 3):
        assert f"model.layers.{layer}.mlp.down_proj.weight" in t
        assert f"model.layers.{layer}.mlp.down_proj.weight_packed" not in t
    assert "model.layers.1.mlp.down_proj.weight_packed" in t


def test_prequantized_checkpoint_is_taken_as_is(stage_inputs, tmp_path):
    ckpt, cal = stage_inputs
    original = quantize_model(QuantConfig(method="gptq"), ckpt, cal, str(tmp_path / "elsewhere"))
    taken = quantize_model(QuantConfig(method="prequantized", checkpoint=original.uri), ckpt, None,
                           str(tmp_path / "run"))
    assert taken.entry_point == "none"
    assert {k: v for k, v in taken.files.items() if k != "quantflow_recipe.yaml"} == \
        {k: v for k, v in original.files.items() if k != "quantflow_recipe.yaml"}
    with pytest.raises(StageError, match="is not a quantized checkpoint"):
        quantize_model(QuantConfig(method="prequantized", checkpoint=ckpt.local_path), ckpt, None,
                       str(tmp_path / "bad"))


def progress_records(caplog) -> list[tuple[float, str]]:
    return [(r.quantflow_pct, r.getMessage()) for r in caplog.records
            if r.name == "quantflow.progress" and hasattr(r, "quantflow_pct")]


@pytest.mark.slow
def test_quantize_reports_decoder_layer_k_of_n(stage_inputs, tmp_path, caplog):
    """GPTQ calibrates layer by layer: the stage's progress names each decoder layer as
    oneshot's sequential pass reaches it, rises, and ends at 100% (the UI's progress artifact
    and the CLI's line carry these records)."""
    ckpt, cal = stage_inputs
    with caplog.at_level(logging.INFO, logger="quantflow.progress"):
        quantize_model(QuantConfig(method="gptq"), ckpt, cal, str(tmp_path))
    records = progress_records(caplog)
    pcts = [p for p, _ in records]
    assert pcts[0] == 0.0 and pcts[-1] == 100.0 and pcts == sorted(pcts) and len(set(pcts)) == len(pcts), records
    # Four decoder layers in the first of two phases: 12.5% each (layer 1's start is 0%).
    layers = [m for _, m in records if "calibrating decoder layer" in m]
    assert [m.split("% ", 1)[1] for m in layers] == [
        f"calibrating decoder layer {k} of 4" for k in (2, 3, 4)], records
    assert (50.0, "quantize  50.0% 4 decoder layers calibrated") in records, records


def test_cli_progress_line_rewrites_one_line_per_stage():
    from quantflow.cli import ProgressLine
    from quantflow.progress import stage_progress

    stream = io.StringIO()
    logger = logging.getLogger("quantflow.progress")
    handler = ProgressLine(stream)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        with stage_progress("validate", ["perplexity"]) as tracker:
            for i in range(1, 5):
                tracker.update("perplexity", i, 4)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = stream.getvalue()
    # Each update rewrites the line in place ("\r" + erase); only 100% ends it.
    assert text.count("\n") == 1 and text.endswith("validate 100.0% perplexity 4 of 4\n"), repr(text)
    assert text.split("\r\x1b[K")[1:] == ["validate   0.0% started", "validate  25.0% perplexity 1 of 4",
                                          "validate  50.0% perplexity 2 of 4", "validate  75.0% perplexity 3 of 4",
                                          "validate 100.0% perplexity 4 of 4\n"]
