"""`quantflow search`: a pipeline config plus the candidates to try and how to choose."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, model_validator

from quantflow.config.base import StrictModel
from quantflow.config.pipeline import PipelineConfig, build_config, read_config_file
from quantflow.config.quant import ALLOWED_BITS, QuantConfig


class Candidate(QuantConfig):
    """One `quant:` block to try, plus whether to keep the most sensitive decoder layers in
    full precision (integer-weight methods only)."""

    keep_sensitive: bool = False
    """Keep the fewest decoder layers, most sensitive first (sensitivity.json), that make this
    scheme pass the gate: 1 layer, then 2, … up to max_kept_layers."""
    max_kept_layers: int | None = Field(default=None, ge=1)
    """None = all but one decoder layer."""

    @model_validator(mode="after")
    def _check_keep(self) -> "Candidate":
        if self.keep_sensitive and self.method not in ALLOWED_BITS:
            raise ValueError(f"keep_sensitive applies to integer-weight methods "
                             f"({', '.join(ALLOWED_BITS)}), not {self.method!r}")
        if self.max_kept_layers is not None and not self.keep_sensitive:
            raise ValueError("max_kept_layers applies only with keep_sensitive: true")
        if self.method == "prequantized":
            raise ValueError("method 'prequantized' is one fixed checkpoint, not a candidate to "
                             "search: validate it with `quantflow run`")
        return self

    def quant(self) -> QuantConfig:
        return QuantConfig.model_validate(self.model_dump(exclude={"keep_sensitive", "max_kept_layers"},
                                                          exclude_defaults=True))

    @property
    def name(self) -> str:
        return self.label + ("-keep-sensitive" if self.keep_sensitive else "")


def default_candidates() -> list[Candidate]:
    """Most to least aggressive: the usual remediation list, in the order a person works it."""
    return [Candidate(method="gptq", bits=4, group_size=128),
            Candidate(method="awq", bits=4, group_size=128),
            Candidate(method="gptq", bits=4, group_size=64),
            Candidate(method="gptq", bits=4, group_size=128, keep_sensitive=True),
            Candidate(method="w8a8"),
            Candidate(method="fp8", fp8_scheme="dynamic"),
            Candidate(method="rtn", bits=8, group_size=-1)]


class SearchSpec(StrictModel):
    objective: Literal["smallest", "fastest"] = "smallest"
    """Smallest: fewest bytes among passing candidates; fastest: highest measured serving
    throughput (needs validation.performance.enabled)."""
    mode: Literal["ladder", "sweep"] = "ladder"
    """Ladder: stop at the first candidate (in list order) that passes; sweep: run them all and
    report the Pareto front of quality against size (and speed when measured)."""
    candidates: list[Candidate] = Field(default_factory=default_candidates, min_length=1)
    """The quant blocks to try, most aggressive first (a ladder stops at the first that passes);
    default: the usual remediation list from GPTQ W4A16 to 8-bit RTN."""
    concurrency: int = Field(default=1, ge=1, le=64)
    """Candidates quantized + validated at once (mapped Prefect tasks; each holds a pool slot when
    placement.pools sends its stages to GPU pools). A ladder runs in waves this wide."""
    sensitivity_samples: int = Field(default=16, ge=1)
    """Calibration samples used to measure each layer's sensitivity (a forward pass per layer)."""

    def named(self) -> list[tuple[str, Candidate]]:
        """Candidates with unique display names: a scheme listed twice with different
        settings (e.g. two smoothing strengths) becomes w8a8 and w8a8-2."""
        seen: dict[str, int] = {}
        out = []
        for c in self.candidates:
            seen[c.name] = seen.get(c.name, 0) + 1
            out.append((c.name if seen[c.name] == 1 else f"{c.name}-{seen[c.name]}", c))
        return out


class SearchConfig(PipelineConfig):
    search: SearchSpec = SearchSpec()
    """What `quantflow search` tries and how it picks: candidates, ladder or sweep, objective."""

    @model_validator(mode="after")
    def _search_rules(self) -> "SearchConfig":
        if self.search.objective == "fastest" and not self.validation.performance.enabled:
            raise ValueError("search.objective 'fastest' needs measured serving speed: set "
                             "validation.performance.enabled: true, or use objective 'smallest'")
        dumps = [c.model_dump_json() for c in self.search.candidates]
        for i, d in enumerate(dumps):
            if d in dumps[:i]:
                raise ValueError(f"search.candidates.{i} repeats candidate {dumps.index(d)} "
                                 f"({self.search.candidates[i].name}): remove the duplicate")
        return self


def load_search_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchConfig:
    return cast(SearchConfig, build_config(read_config_file(path), overrides, str(path), model=SearchConfig))
