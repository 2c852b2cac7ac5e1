"""Prefect flows: they only wire stages together; stage logic lives in quantflow.tasks."""

import logging

# A flow run started by a worker configures only Prefect's loggers: without a level of its
# own, quantflow's INFO lines (stage progress, the verdict) fall below the root's WARNING and
# never reach the run's logs. An application that set a level keeps it.
if logging.getLogger("quantflow").level == logging.NOTSET:
    logging.getLogger("quantflow").setLevel(logging.INFO)
