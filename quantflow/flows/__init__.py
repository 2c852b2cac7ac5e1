"""Prefect flows: they only wire stages together; stage logic lives in quantflow.tasks."""
