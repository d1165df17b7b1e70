# slmkit: `make` lists the targets. Every target sets up the locked environment (.venv) first if needed.
SHELL := /bin/bash
.DEFAULT_GOAL := help
.SHELLFLAGS := -eu -o pipefail -c

VENV ?= .venv
EXTRA ?= cpu
ARGS ?=
TEXT ?=
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.slmkit-installed
STAGES := prepare base train merge quantize evaluate

# dvc.yaml runs `python scripts/<stage>.py`: resolve `python` and `dvc` to the locked environment.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export OLIVE_DISABLE_TELEMETRY := 1

.PHONY: help setup lock params finetune $(STAGES) classify test test-fast lint clean

help: ## Show the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(ENV_STAMP): requirements/$(EXTRA).txt pyproject.toml scripts/setup.sh
	scripts/setup.sh $(EXTRA) $(VENV)

setup: $(ENV_STAMP) ## Create or refresh the locked environment in .venv (EXTRA=cpu|cuda)

lock: $(ENV_STAMP) ## Re-resolve pyproject.toml into requirements/cpu.txt (pip-compile)
	$(VENV)/bin/pip-compile --quiet --extra cpu --extra dev --strip-extras --no-emit-index-url \
		--no-emit-find-links --no-header -o requirements/cpu.txt pyproject.toml

params: $(ENV_STAMP) ## Compose conf/ (+ ARGS="key=value ...") into params.yaml
	$(PY) scripts/compose.py $(ARGS)

finetune: $(ENV_STAMP) ## Run the whole pipeline: data -> LoRA -> merge -> int4 ONNX -> eval (ARGS=overrides)
	$(PY) scripts/compose.py $(ARGS)
	dvc repro
	$(PY) -m slmkit.cli summary

$(STAGES): $(ENV_STAMP) ## (prepare|base|train|merge|quantize|evaluate) Run the pipeline up to this stage
	dvc repro $@

classify: $(ENV_STAMP) ## Label a phrase with the int4 model: make classify TEXT="I can't stop smiling"
	@test -n "$(TEXT)" || { echo 'usage: make classify TEXT="a phrase"'; exit 2; }
	$(PY) -m slmkit.cli classify "$(TEXT)"

test: $(ENV_STAMP) ## Run the default and slow tests (the slow ones run the real pipeline)
	$(PY) -m pytest -m "not gpu"

test-fast: $(ENV_STAMP) ## Run the default tests only
	$(PY) -m pytest -m "not slow and not gpu"

lint: $(ENV_STAMP) ## ruff (lint + format check)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean: ## Remove pipeline outputs (the DVC cache keeps them: `dvc checkout` restores)
	rm -rf artifacts metrics
