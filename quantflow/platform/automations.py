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


def install_automations(api_url: str, webhook_url: str,
                        path: Path = Path(__file__).resolve().parents[2] / "infra/automations/quantflow-alerts.yaml") -> list[str]:
    """A webhook notification block for `webhook_url`, and the automations that use it
    (replacing earlier ones of the same name). Returns the automation names."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        block = CustomWebhookNotificationBlock(
            name="quantflow-alerts", url=webhook_url, allow_private_urls=True,
            json_data={"subject": "{{subject}}", "body": "{{body}}"})
        block_id = block.save("quantflow-alerts", overwrite=True)
        names = []
        with get_client(sync_client=True) as client:
            for automation in load_automations(path, str(block_id)):
                for old in client.read_automations_by_name(automation.name):
                    client.delete_automation(old.id)
                client.create_automation(automation)
                names.append(automation.name)
    return names


RECOVERY = Path(__file__).resolve().parents[2] / "infra/automations/quantflow-recovery.yaml"


def install_recovery(api_url: str, path: Path = RECOVERY) -> list[str]:
    """Automations that need no notification block (crashed runs are scheduled again)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    names = []
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for automation in load_automations(path, ""):
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            client.create_automation(automation)
            names.append(automation.name)
    return names
