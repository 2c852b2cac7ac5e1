"""The whole pipeline's configuration: one YAML file, overridable from the command line."""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from quantflow.config.base import StrictModel
from quantflow.config.model import CalibrationConfig, ModelSpec
from quantflow.config.placement import PlacementConfig
from quantflow.config.quant import QuantConfig
from quantflow.config.serving import DeployConfig, MonitorConfig
from quantflow.config.validation import ValidationConfig
from quantflow.errors import ConfigError


class PipelineConfig(StrictModel):
    name: str = Field(default="quantflow", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    """Names the run's output folder, Prefect artifacts and served model."""
    output_dir: str | None = None
    """Local folder or s3://bucket/prefix for every artifact; default runs/<name>."""
    model: ModelSpec
    """Stage 1: the full-precision checkpoint to quantize, and how it is loaded."""
    calibration: CalibrationConfig = CalibrationConfig()
    """Stage 2: the calibration tokens (used by GPTQ, AWQ, W8A8 and static FP8; data-free schemes
    skip it)."""
    quant: QuantConfig = QuantConfig()
    """Stage 3: the quantization method and scheme, in AutoGPTQ/AutoAWQ vocabulary, run by llm-
    compressor."""
    validation: ValidationConfig = ValidationConfig()
    """Stage 4: the checks that judge the quantized model against the baseline, and their
    thresholds (the quality gate)."""
    deploy: DeployConfig = DeployConfig()
    """Stage 5: how the model that passed is served on vLLM (deploy.enabled: false stops after
    validation)."""
    monitor: MonitorConfig = MonitorConfig()
    """Stage 6: quality probes, latency alerts and the Prometheus exporter for the served model."""
    placement: PlacementConfig = PlacementConfig()
    """Where stages run: in this flow's process (default) or on Prefect work pools per GPU class."""

    @property
    def output_uri(self) -> str:
        return self.output_dir or f"runs/{self.name}"

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "PipelineConfig":
        # NVFP4/MXFP4 checkpoints only run in bfloat16; both models are evaluated in the
        # same dtype, so the baseline follows (it is measured again, in bfloat16).
        if self.quant.method in ("nvfp4", "mxfp4"):
            if self.validation.dtype == "float16":
                raise ValueError(f"validation.dtype float16 cannot run {self.quant.method} checkpoints; "
                                 "use bfloat16")
            if self.validation.dtype == "float32":
                self.validation = self.validation.model_copy(update={"dtype": "bfloat16"})
        if self.monitor.metrics_port in (self.deploy.port, self.deploy.port + 1):
            raise ValueError(f"monitor.metrics_port {self.monitor.metrics_port} collides with the serving "
                             f"ports deploy.port and deploy.port + 1 ({self.deploy.port}, {self.deploy.port + 1})")
        return self


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed where an unknown key `loc` sits, following nested config models."""
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # a list item: same model as the list's
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        if field is None:
            return []
        node = next((t for t in (field.annotation, *typing.get_args(field.annotation))
                     if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if node is None:
            args = [a for arg in typing.get_args(field.annotation) for a in typing.get_args(arg)]
            node = next((t for t in args if isinstance(t, type) and issubclass(t, BaseModel)), None)
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return []
    return [*node.model_fields, *getattr(node, "legacy_keys", ())]


def format_validation_error(err: ValidationError, model: type[BaseModel] | None = None) -> list[str]:
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), _known_keys(model, e["loc"]), n=1) if model else []
            msg = (f"unknown key; did you mean {close[0]!r}?" if close else
                   "unknown key (misspelt? see the configs/ examples for the valid keys)")
        elif e["type"] == "missing":
            msg = "required"
        problems.append(f"{where}: {msg}" if where and not msg.startswith(where) else msg)
    return problems


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    if isinstance(value, float) and value.is_integer() and value >= 1:
        value = int(value)  # "--limit 20" means 20 examples, not a fraction
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError("command line", [f"{dotted}: {key} is not a section"])
    node[leaf] = value


def build_config(data: dict[str, Any], overrides: dict[str, Any] | None = None,
                 source: str = "parameters", model: type[PipelineConfig] = PipelineConfig) -> PipelineConfig:
    """`model`: PipelineConfig, or a config that extends it (the search's)."""
    data = copy.deepcopy(data)  # overrides must not change the caller's nested dicts
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, format_validation_error(err, model)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path`, or a ConfigError naming the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(p), ["file not found: pass an existing YAML file to --config"])
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(str(p), [f"not valid YAML: {err}"]) from None
    if not isinstance(loaded, dict):
        raise ConfigError(str(p), ["the top level must be a mapping of sections"])
    return loaded


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read a YAML config (optional) and apply dotted overrides like {"quant.bits": 3}."""
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        data, source = read_config_file(path), str(path)
        if "search" in data:
            raise ConfigError(source, ["search: this file configures a search over candidates; run "
                                       f"`quantflow search --config {path}`, or remove the search section"])
    if "model" not in data and not (overrides or {}).get("model.id"):
        raise ConfigError(source, ["model.id: required (pass --model <hub id or path>)"])
    return build_config(data, overrides, source)
