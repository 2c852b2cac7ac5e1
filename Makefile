# quantflow — the two commands: `make demo` (end to end on this machine) and `make test`.
PYTHON ?= python3
VENV := .venv
SERVE_VENV := .venv-serve
QF := $(VENV)/bin/quantflow
PYTEST_ARGS ?=

.PHONY: setup serve-env print-install system-packages demo stop test test-fast up down benchmark benchmark-serving benchmark-platform benchmark-search quality-table clean

# uv installs the pinned sets in seconds where pip took minutes (measured on this machine
# kind: the serving set in 15 s with uv, 132 s with pip). uv reads no pip config, so the
# local wheel folder pip's find-links names (PIP_FIND_LINKS, else LOCAL_WHEELS where it
# exists: /opt/wheels here) is passed to it.
#
# Where torch comes from: both sets pin its CPU build, torch==2.13.0+cpu, a version that only
# PyTorch's CPU wheel index publishes (PyPI has none with the +cpu label).
# - A local wheel folder holding that wheel (this machine kind: /opt/wheels): uv takes it
#   from there and never asks download.pytorch.org (which such a machine cannot reach).
# - Anywhere else: --torch-backend cpu. uv then takes the PyTorch packages alone (torch,
#   triton, torchvision, ...) from https://download.pytorch.org/whl/cpu and every other pin
#   from PyPI as before. Not --extra-index-url .../whl/cpu: uv ranks an extra index above
#   PyPI and, by its default first-index strategy, takes every package that index also
#   mirrors (numpy, jinja2, fastapi, transformers, ...) from it alone, failing where it lacks
#   the pinned version; --index-strategy unsafe-best-match would let any package come from
#   either host, the dependency confusion first-index exists to prevent.
# `make print-install` prints the resulting command (tests/test_install.py checks both cases).
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
LOCAL_WHEELS ?= /opt/wheels
FIND_LINKS := $(or $(PIP_FIND_LINKS),$(wildcard $(LOCAL_WHEELS)))
TORCH_PIN := $(shell sed -n 's/^torch==//p' requirements/pipeline.txt)
LOCAL_TORCH := $(firstword $(foreach dir,$(FIND_LINKS),$(wildcard $(dir)/torch-$(TORCH_PIN)-*.whl)))
TORCH_SOURCE := $(strip $(addprefix --find-links ,$(FIND_LINKS)) $(if $(LOCAL_TORCH),,--torch-backend cpu))
UV_INSTALL = $(UV) pip install -q --no-deps $(TORCH_SOURCE)
# --compile-bytecode: where PYTHONDONTWRITEBYTECODE=1 (this machine kind, many containers)
# Python writes no .pyc, so every worker run, vLLM server and CLI call would compile torch,
# transformers and vLLM from source: about twice the import time (docs/benchmarks.md, "Import
# cost"). Kept out of UV_INSTALL, which tests/test_install.py resolves with `uv pip compile`
# (no such flag there).
SETUP_INSTALL = $(UV_INSTALL) --compile-bytecode

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)

# Pipeline environment: Prefect, llm-compressor, lm-eval (pinned; CPU torch here).
$(VENV)/.installed: requirements/pipeline.txt pyproject.toml | $(UV)
	$(SETUP_INSTALL) --python $(VENV)/bin/python -r requirements/pipeline.txt
	$(SETUP_INSTALL) --python $(VENV)/bin/python -e .
	touch $@

# Serving environment: vLLM in its own venv (its pins conflict with the pipeline's).
$(SERVE_VENV)/.installed: requirements/serving.txt | $(UV)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SETUP_INSTALL) --python $(SERVE_VENV)/bin/python -r requirements/serving.txt
	touch $@

setup: $(VENV)/.installed $(SERVE_VENV)/.installed
serve-env: $(SERVE_VENV)/.installed

print-install:
	@echo '$(UV_INSTALL)'

demo: setup system-packages
	$(QF) demo

stop:
	@if [ -x $(QF) ]; then $(QF) stop; fi

# nginx and prometheus from Debian: nginx keeps the demo's endpoint at one address through
# rollouts; the stable-endpoint and alert-rule tests start both.
system-packages:
	scripts/system-packages.sh

test: setup system-packages
	$(VENV)/bin/python -m quantflow.demo
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow and not serving and not integration" $(PYTEST_ARGS)

up: setup
	$(VENV)/bin/python -m quantflow.platform up $(if $(ENV_FILE),--env-file $(ENV_FILE)) $(if $(WORKERS),--workers $(WORKERS)) $(if $(WORKER_LIMIT),--worker-limit $(WORKER_LIMIT))

down:
	@if [ -x $(VENV)/bin/python ]; then $(VENV)/bin/python -m quantflow.platform down; fi

# The pipeline's own cost at real model sizes (docs/benchmarks.md); builds 1B- and
# 8B-shaped checkpoints once into .cache/bench (about 19 GB of disk).
benchmark: setup
	$(VENV)/bin/python -m quantflow.demo
	$(VENV)/bin/python benchmarks/pipeline_cost.py

# Serving speed of the demo model, baseline vs quantized (docs/validation.md).
benchmark-serving: setup
	$(VENV)/bin/python -m quantflow.demo
	$(VENV)/bin/python benchmarks/serving_performance.py

# 20 REST-triggered runs on PostgreSQL + Redis and on SQLite (docs/platform.md).
benchmark-platform: setup
	$(VENV)/bin/python -m quantflow.demo
	$(VENV)/bin/python benchmarks/platform_load.py

# An N-candidate `quantflow search` vs N separate `quantflow run`s (docs/search.md).
benchmark-search: setup
	$(VENV)/bin/python -m quantflow.demo
	$(VENV)/bin/python benchmarks/search_cost.py

quality-table: setup
	$(VENV)/bin/python -m quantflow.demo
	$(VENV)/bin/python -m quantflow.demo.quality_table --out docs/quality-table.md

clean: stop down
	rm -rf runs .quantflow
