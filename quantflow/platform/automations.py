"""Prefect automations for quantflow's events (infra/automations/*.yaml)."""

from __future__ import annotations

from pathlib import Path

import yaml

PLACEHOLDER = "{{ notification_block_id }}"


def load_automations(path: Path, notification_block_id: str):
    """Parse the file, fill in the notification block, validate with Prefect's own schema."""
    from prefect.events.schemas.automations import AutomationCore

    text = Path(path).read_text().replace(PLACEHOLDER, notification_block_id)
    return [AutomationCore.model_validate(a) for a in yaml.safe_load(text)["automations"]]
