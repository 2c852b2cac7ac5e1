"""Configuration models. Every model forbids unknown keys."""

from quantflow.config.model import CalibrationConfig, ModelSpec, TextSource
from quantflow.config.pipeline import PipelineConfig, build_config, load_config
from quantflow.config.placement import PlacementConfig
from quantflow.config.quant import QuantConfig
from quantflow.config.serving import CompletionCheck, DeployConfig, KubernetesTarget, MonitorConfig
from quantflow.config.validation import (ConsistencyCheck, LmEvalCheck, LmEvalTask, PerformanceCheck,
                                         PerplexityCheck, ServedFidelityCheck, ValidationConfig)

__all__ = ["CalibrationConfig", "CompletionCheck", "ConsistencyCheck", "PerformanceCheck", "DeployConfig",
           "KubernetesTarget", "LmEvalCheck", "LmEvalTask", "ModelSpec", "MonitorConfig",
           "PerplexityCheck", "PipelineConfig", "PlacementConfig", "QuantConfig", "ServedFidelityCheck", "TextSource",
           "ValidationConfig", "build_config", "load_config"]
