# quantflow — the two commands: `make demo` (end to end on this machine) and `make test`.
PYTHON ?= python3
VENV := .venv
SERVE_VENV := .venv-serve
QF := $(VENV)/bin/quantflow
PYTEST_ARGS ?=

.PHONY: setup serve-env demo stop test test-fast up down benchmark quality-table clean

# Pipeline environment: Prefect, llm-compressor, lm-eval (pinned; CPU torch here).
$(VENV)/.installed: requirements/pipeline.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -r requirements/pipeline.txt
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

# Serving environment: vLLM in its own venv (its pins conflict with the pipeline's).
$(SERVE_VENV)/.installed: requirements/serving.txt
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --disable-pip-version-check --no-deps -r requirements/serving.txt
	touch $@

setup: $(VENV)/.installed $(SERVE_VENV)/.installed
serve-env: $(SERVE_VENV)/.installed

demo: setup
	$(QF) demo

stop:
	@if [ -x $(QF) ]; then $(QF) stop; fi

test: setup
	$(VENV)/bin/python -m quantflow.demo
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow and not serving and not integration" $(PYTEST_ARGS)

up: setup
	$(VENV)/bin/python -m quantflow.platform up $(if $(ENV_FILE),--env-file $(ENV_FILE)) $(if $(WORKERS),--workers $(WORKERS)) $(if $(WORKER_LIMIT),--worker-limit $(WORKER_LIMIT))

down:
	@if [ -x $(VENV)/bin/python ]; then $(VENV)/bin/python -m quantflow.platform down; fi

benchmark: setup
	$(VENV)/bin/python -m quantflow.demo
	$(VENV)/bin/python benchmarks/perplexity_vs_lmeval.py
	$(VENV)/bin/python benchmarks/serving_performance.py
	$(VENV)/bin/python benchmarks/platform_load.py

quality-table: setup
	$(VENV)/bin/python -m quantflow.demo
	$(VENV)/bin/python -m quantflow.quality_table --out docs/quality-table.md

clean: stop down
	rm -rf runs .quantflow
