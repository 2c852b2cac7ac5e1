"""The platform setup: Prefect server, work pools, workers, deployments, automations."""
