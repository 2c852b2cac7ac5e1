"""Configuration: legacy vocabulary, and bad configs refused before any model is loaded."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from quantflow.config import QuantConfig, load_config
from quantflow.errors import ConfigError
from quantflow.quantization.recipes import recipe_dict, streaming_scheme


@pytest.mark.parametrize("overrides, field, allowed", [
    ({"quant.bits": 5}, "quant.bits", "Input should be 2, 3, 4 or 8"),
    ({"quant.group_size": 100}, "quant.group_size", "Input should be -1, 32, 64 or 128"),
    ({"quant.method": "squeezellm"}, "quant.method", "'gptq', 'awq', 'rtn'"),
    ({"quant.method": "awq", "quant.bits": 8}, "quant.bits", "allowed: 3, 4"),
    ({"quant.bitz": 4}, "quant.bitz", "unknown key"),
    ({"deploy.rollout.steps": [50, 10, 100]}, "deploy.rollout.steps", "steps must increase"),
    ({"deploy.rollout.steps": [10, 50]}, "deploy.rollout.steps", "steps must end at 100"),
    ({"deploy.rollout.steps": [0, 100]}, "deploy.rollout.steps", "from 1 to 100"),
    ({"deploy.rollout.mirror.share": 1.5}, "deploy.rollout.mirror.share", "less than or equal to 1"),
    ({"deploy.rollout.mirror.share": -0.1}, "deploy.rollout.mirror.share", "greater than or equal to 0"),
    ({"deploy.rollout.strategy": "canary", "deploy.proxy": "none"}, "deploy", "needs backend local and deploy.proxy"),
])
def test_bad_config_names_field_and_allowed_values(overrides, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"model.id": "org/model", **overrides})
    assert field in str(err.value)
    assert allowed in str(err.value)


def test_bad_config_fails_before_any_model_is_loaded(tmp_path):
    """The CLI exits 1 with the config error; no stage ran (no output folder exists)."""
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "-m", "quantflow.cli", "run", "--model", "/no/such/model",
                           "--method", "gptq", "--bits", "5", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "quant.bits: Input should be 2, 3, 4 or 8" in proc.stderr
    assert not out.exists()


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {id: x}\nquant: {method: gptq, damp_precent: 0.1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert str(cfg) in str(err.value) and "quant.damp_precent" in str(err.value)


def test_autogptq_keys_translate():
    q = QuantConfig.model_validate({"method": "gptq", "bits": 3, "group_size": 64, "desc_act": True,
                                    "damp_percent": 0.05, "sym": False, "true_sequential": True})
    assert (q.bits, q.group_size, q.actorder, q.dampening_frac, q.symmetric) == (3, 64, "group", 0.05, False)
    mods = recipe_dict(q)["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    assert mods["actorder"] == "group" and mods["dampening_frac"] == 0.05
    assert mods["config_groups"]["group_0"]["weights"] == {
        "num_bits": 3, "type": "int", "symmetric": False, "strategy": "group", "group_size": 64}


def test_autoawq_keys_translate():
    q = QuantConfig.model_validate({"method": "awq", "w_bit": 4, "q_group_size": 64,
                                    "zero_point": True, "version": "GEMV"})
    assert (q.bits, q.group_size, q.symmetric, q.awq_version) == (4, 64, False, "GEMV")
    stage = recipe_dict(q)["quant_stage"]["quant_modifiers"]
    assert list(stage) == ["AWQModifier", "QuantizationModifier"]


def test_conflicting_alias_is_an_error():
    with pytest.raises(ValueError, match="w_bit and quant.bits"):
        QuantConfig.model_validate({"method": "gptq", "bits": 4, "w_bit": 3})


def test_fixed_scheme_methods_reject_integer_settings():
    with pytest.raises(ValueError, match="quant.bits does not apply to method 'fp8'"):
        QuantConfig.model_validate({"method": "fp8", "bits": 8})


def test_data_free_methods_take_the_streaming_path():
    assert streaming_scheme(QuantConfig(method="fp8", fp8_scheme="dynamic")) == "FP8_DYNAMIC"
    assert streaming_scheme(QuantConfig(method="fp8", fp8_scheme="static")) is None  # calibrated
    assert streaming_scheme(QuantConfig(method="rtn", bits=4))["weights"]["num_bits"] == 4
    assert streaming_scheme(QuantConfig(method="gptq")) is None
    assert streaming_scheme(QuantConfig(method="rtn", streaming=False)) is None


def test_method_specific_requirements():
    with pytest.raises(ValueError, match="quant.recipe is required"):
        QuantConfig(method="recipe")
    with pytest.raises(ValueError, match="quant.checkpoint is required"):
        QuantConfig(method="prequantized")


@pytest.mark.parametrize("search, message", [
    ({"objective": "fastest"}, "search.objective 'fastest' needs measured serving speed"),
    ({"candidates": [{"method": "fp8", "keep_sensitive": True}]}, "keep_sensitive applies to integer-weight"),
    ({"candidates": [{"method": "w8a8"}, {"method": "w8a8"}]}, "search.candidates.1 repeats candidate 0"),
    ({"candidates": []}, "search.candidates: List should have at least 1 item"),
    ({"mode": "bisect"}, "search.mode: Input should be 'ladder' or 'sweep'"),
])
def test_bad_search_config_names_the_field(tmp_path, search, message):
    import yaml

    from quantflow.config.search import load_search_config

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"model": {"id": "m"}, "search": search}))
    with pytest.raises(ConfigError) as err:
        load_search_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_search_names_repeated_schemes_apart():
    from quantflow.config.search import SearchSpec

    spec = SearchSpec(candidates=[{"method": "w8a8"}, {"method": "w8a8", "smoothing_strength": 0.5},
                                  {"method": "gptq", "keep_sensitive": True}])
    assert [n for n, _ in spec.named()] == ["w8a8", "w8a8-2", "gptq-w4a16-g128-keep-sensitive"]
    assert spec.candidates[2].quant() == QuantConfig(method="gptq")  # keep_sensitive is the search's


def _undescribed(schema: dict) -> list[str]:
    models = {"": schema, **schema.get("definitions", {}), **schema.get("$defs", {})}
    return [f"{model or schema['title']}.{name}" for model, node in models.items()
            for name, prop in node.get("properties", {}).items() if not (prop.get("description") or "").strip()]


def test_every_config_field_has_a_description_in_the_ui_form():
    """The Prefect UI renders a deployment's run form from the flow's parameter schema, so
    every field there, nested models included, must say what it does (issue 23)."""
    from prefect.utilities.callables import parameter_schema

    from quantflow.config import PipelineConfig
    from quantflow.config.search import SearchConfig
    from quantflow.flows.pipeline import quantize_pipeline
    from quantflow.flows.search import quantize_search

    for model in (PipelineConfig, SearchConfig):
        schema = model.model_json_schema()
        assert len(schema["$defs"]) >= 15 and not _undescribed(schema), _undescribed(schema)
    for flow in (quantize_pipeline, quantize_search):
        form = parameter_schema(flow.fn).model_dump()
        assert form["definitions"] and not _undescribed(form), _undescribed(form)
    threshold = PipelineConfig.model_json_schema()["$defs"]["PerplexityCheck"]["properties"]["max_increase_pct"]
    assert "percent" in threshold["description"], threshold


# A field named for a unit or a ratio reads as a bare name in the form unless its title says
# what the number is: each such field carries a title naming the unit, and examples.
UNIT_FIELD = re.compile(r"(_pct|_s|_ms|_gib|_frac|_ratio|_rate|share|tolerance|recovery|_kl|_score|agreement"
                        r"|strength|utilization|_drop|max_model_len|window)$")
UNIT_IN_TITLE = {"_pct": "(%)", "_s": "(s)", "_ms": "(ms)", "_gib": "(GiB)"}


def test_fields_named_for_a_unit_or_ratio_have_a_title_and_examples():
    from quantflow.config.reference import field_rows
    from quantflow.config.search import SearchConfig

    rows = [r for r in field_rows(SearchConfig) if UNIT_FIELD.search(r.path.rsplit(".", 1)[-1])]
    assert len(rows) >= 30, [r.path for r in rows]
    untitled = [r.path for r in rows if not r.title or not r.examples]
    assert untitled == [], untitled
    for row in rows:
        unit = next((u for suffix, u in UNIT_IN_TITLE.items() if row.path.endswith(suffix)), None)
        assert unit is None or unit in row.title, (row.path, row.title)
    # The Prefect form shows these titles as the field labels (tests/test_browser.py finds
    # max_kl by its title), and the JSON schema carries the examples.
    schema = SearchConfig.model_json_schema()["$defs"]["ConsistencyCheck"]["properties"]["max_kl"]
    assert schema["title"] == "Max mean next-token KL (nats)" and schema["examples"] == [0.1, 0.05]


def test_configuration_reference_doc_is_generated_from_the_fields():
    """docs/configuration.md is `quantflow fields --markdown --search`: a field added, renamed
    or re-described without regenerating it fails here."""
    from quantflow.config.reference import render_markdown
    from quantflow.config.search import SearchConfig

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert doc == render_markdown(SearchConfig), \
        "docs/configuration.md is stale: run `.venv/bin/quantflow fields --markdown --search > docs/configuration.md`"
    assert "| `validation.perplexity.max_increase_pct` | float | `10.0` | **Max perplexity increase (%)**." in doc


def test_run_flags_and_fields_command_show_the_fields_own_text(capsys):
    from quantflow import cli
    from quantflow.config import PipelineConfig
    from quantflow.config.reference import field_rows

    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    described = {r.path: r.description for r in field_rows(PipelineConfig)}
    for path in ("quant.bits", "quant.group_size", "validation.lm_eval.limit"):
        assert f"{path}: {described[path]}" in help_text, path
    assert cli.main(["fields", "deploy.rollout.mirror"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("deploy.rollout.mirror: MirrorConfig") and "deploy.rollout.mirror.share: float = 0.25" in out
    assert "Fraction of the requests (0-1) nginx copies" in out and "e.g. 0.1, 0.25" in out
    assert cli.main(["fields", "deploy.rollout.mirror.shares"]) == 1
    err = capsys.readouterr().err
    assert "PipelineConfig has no field 'deploy.rollout.mirror.shares'" in err and "deploy.rollout.mirror.share" in err
