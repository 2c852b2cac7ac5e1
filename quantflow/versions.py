"""Versions of the tools that determine a stage's output; part of every cache key."""

from __future__ import annotations

from functools import cache
from importlib import metadata

import quantflow

PIPELINE_TOOLS = ("torch", "transformers", "llmcompressor", "compressed-tensors", "lm_eval",
                  "datasets", "tokenizers")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@cache
def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"quantflow": quantflow.__version__}
    versions.update({name: package_version(name) for name in PIPELINE_TOOLS})
    return versions
