"""Shared base for every configuration model: a misspelt key is an error, not a silent default."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    # Each field's docstring is its description: the Prefect UI's run form, the JSON schema and
    # these files show one text, written once.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)
