# slmkit: `make` lists the targets. Every target sets up the locked environment (.venv) first if needed.
SHELL := /bin/bash
.DEFAULT_GOAL := help
.SHELLFLAGS := -eu -o pipefail -c

VENV ?= .venv
EXTRA ?= cpu
ARGS ?=
TEXT ?=
FILE ?=
MODEL ?= onnx
PORT ?= 8000
ARTIFACT ?=
# make import-data URL=azure://<container>/<path> [TO=data/<name>]; make update-data [TO=data/<name>]
URL ?=
TO ?=
# make bench-family RECIPE="builder=int8_cpu": the recipe whose gap is measured (default: params.yaml's)
RECIPE ?=
# UNGATED=1: classify/serve/chat/push use the pipeline's model even when the parity gate did not pass it.
UNGATED ?=
UNGATED_FLAG := $(if $(UNGATED),--ungated)
PY := $(VENV)/bin/python
# setup.sh records the sha256 of what it installed from; a mismatch (new lock, new clone) reinstalls.
ENV_STAMP := $(VENV)/.slmkit-$(EXTRA)
# The stage targets are dvc.yaml's stages (the one list; slmkit.paths.STAGES reads it too): the keys of its
# `stages:` block. awk, not Python: this runs before the environment exists.
STAGES := $(shell awk '/^stages:/ {s = 1; next} /^[^ \#]/ {s = 0} s && /^  [A-Za-z0-9_-]+:/ {sub(/:.*/, ""); print $$1}' dvc.yaml)

# dvc.yaml runs `python scripts/<stage>.py`: resolve `python` and `dvc` to the locked environment.
export PATH := $(abspath $(VENV))/bin:$(PATH)
export OLIVE_DISABLE_TELEMETRY := 1

.PHONY: help env setup lock params config finetune _finetune _stage $(STAGES) sweep olive-config classify generate serve chat record \
	report bench bench-serve bench-train bench-train-dtypes bench-formats bench-family bench-adapters bench-overhead push pull import-data update-data lineage test test-fast lint clean \
	docker-build docker-finetune docker-test

help: ## Show the targets
	@awk -v stages="$(STAGES)" 'BEGIN {FS = ":.*## "} /^[$$()A-Za-z_ -]+:.*## / \
		{t = $$1; sub(/\$$\(STAGES\)/, stages, t); printf "  %-42s %s\n", t, $$2}' $(MAKEFILE_LIST)

env:
	@sha256sum --status -c $(ENV_STAMP) 2>/dev/null || scripts/setup.sh $(EXTRA) $(VENV)

setup: env ## Create or refresh the locked environment in .venv (EXTRA=cpu|cuda)

# --allow-unsafe: setuptools (torch needs it; the editable install builds with it) and pip are pinned too.
PIP_COMPILE = $(VENV)/bin/pip-compile --quiet --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --no-header

lock: env ## Re-resolve pyproject.toml into requirements/cpu.txt and requirements/cuda.txt (pip-compile)
	$(PIP_COMPILE) --extra cpu --extra dev -o requirements/cpu.txt pyproject.toml
	@# The CUDA lock resolves against PyPI alone: no local find-links (where a CPU torch wheel may lie).
	PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_CONSTRAINT= \
		$(PIP_COMPILE) --extra cuda --extra dev -o requirements/cuda.txt pyproject.toml

params: env ## Compose conf/ (+ ARGS="key=value ...") into params.yaml
	$(PY) scripts/compose.py $(ARGS)

config: env ## Dry run: print the config ARGS compose to and the stages `make finetune ARGS=...` would rerun
	$(PY) scripts/compose.py --dry-run $(ARGS)

# One run per workspace (slmkit.runlock): a second `make finetune` here refuses and changes nothing.
RUNLOCK := $(PY) -m slmkit.runlock

finetune: env ## Run the whole pipeline: data -> LoRA -> merge -> ONNX (int4) -> eval -> adapter (ARGS=overrides)
	$(RUNLOCK) $(MAKE) --no-print-directory _finetune

_finetune:
	$(PY) scripts/compose.py $(ARGS)
	$(if $(DVC_CACHE),dvc cache dir --local $(DVC_CACHE))
	dvc repro
	$(PY) -m slmkit.cli summary
	@# The parity gate's verdict is recorded by `evaluate`; here a refused model stops the run.
	$(PY) -m slmkit.cli gate

$(STAGES): env ## Run the pipeline up to this stage (ARGS=overrides recompose params.yaml first)
	$(RUNLOCK) $(MAKE) --no-print-directory _stage STAGE=$@

_stage:
	$(if $(ARGS),$(PY) scripts/compose.py $(ARGS))
	dvc repro $(STAGE)

sweep: env ## Hydra multirun, one DVC experiment per job: make sweep ARGS="lora.r=4,8 train.learning_rate=1e-4,3e-4"
	$(PY) scripts/compose.py
	$(RUNLOCK) dvc repro base
	$(PY) scripts/sweep.py --multirun $(ARGS)

olive-config: env ## Eject: one Olive config (+ package config) for `olive run` (command printed)
	$(PY) scripts/compose.py $(ARGS)
	$(RUNLOCK) dvc repro base
	$(PY) scripts/eject.py olive-config

classify: env ## Label a phrase (TEXT="...") or a file (FILE=phrases.txt|.jsonl); MODEL=onnx|merged|base|<folder>
	@test -n "$(TEXT)$(FILE)" || { echo 'usage: make classify TEXT="a phrase"  or  make classify FILE=phrases.txt'; exit 2; }
	$(PY) -m slmkit.cli classify --model $(MODEL) $(UNGATED_FLAG) $(if $(FILE),--file "$(FILE)","$(TEXT)")

generate: env ## Answer a question (TEXT="...") or a file (FILE=questions.txt|.jsonl) with a data=qa model; MODEL=...
	@test -n "$(TEXT)$(FILE)" || { echo 'usage: make generate TEXT="a question"  or  make generate FILE=questions.txt'; exit 2; }
	$(PY) -m slmkit.cli generate --model $(MODEL) $(UNGATED_FLAG) $(if $(FILE),--file "$(FILE)","$(TEXT)")

serve: env ## The built model behind an HTTP JSON API on 127.0.0.1 (POST /classify, GET /health; PORT=8000, MODEL=...)
	$(PY) -m slmkit.cli serve --model $(MODEL) --port $(PORT) $(UNGATED_FLAG)

chat: env ## Free generation with the fine-tuned model, line by line (MODEL=onnx|merged|base|<folder>)
	$(PY) -m slmkit.cli chat --model $(MODEL) $(UNGATED_FLAG)

record: env ## Keep the last run's metrics, settings, stage times and machine in metrics/$(NAME)_run.json (NAME=qa)
	@test -n "$(NAME)" || { echo 'usage: make record NAME=qa'; exit 2; }
	$(PY) scripts/record.py $(NAME)

report: env ## Write reports/report.html for the last run: config, lineage, metrics, plots, latency, size
	$(PY) scripts/report.py

bench: env ## Latency/speed/memory/size: int4 ONNX vs fp32 ONNX vs PyTorch, tiny + medium model -> metrics/bench.json
	$(PY) scripts/bench.py

bench-serve: env ## Batched vs one-at-a-time classify; `slmkit serve` at 1, 4, 16 clients on 127.0.0.1 -> metrics/bench.json
	$(PY) scripts/bench.py --serve

bench-train: env ## The train stage's training vs a plain Hugging Face + PEFT loop on the same batches -> metrics/bench.json
	$(PY) scripts/bench.py --train

bench-train-dtypes: env ## The train stage with the frozen base in fp32 vs bf16, same batches -> metrics/bench.json
	$(PY) scripts/bench.py --train --train-dtypes float32,bfloat16

bench-formats: env ## Each number format (int4, int8, fp32, PyTorch bf16) vs its kernel's peak on this CPU -> metrics/bench.json
	$(PY) scripts/bench.py --formats

bench-family: env ## The recipe's built-vs-merged gap over neighbouring runs (ranks, data, seeds) -> metrics/bench.json
	$(PY) scripts/compose.py
	$(RUNLOCK) dvc repro base
	$(PY) scripts/bench.py --family $(if $(RECIPE),--recipe $(RECIPE))

bench-adapters: env ## Two fine-tunes on one base in one server vs a dedicated model: memory, speed, labels -> metrics/bench.json
	$(PY) scripts/bench.py --adapters

bench-overhead: env ## Kit pipeline time vs the same Olive configs by bare `olive run` -> metrics/bench.json
	$(PY) scripts/bench.py --overhead

push: env ## Upload outputs and run cache to the DVC remote, once the parity gate passed the model (UNGATED=1: anyway)
	$(if $(UNGATED),,$(PY) -m slmkit.cli gate)
	dvc push --run-cache

pull: env ## Download outputs and run cache from the DVC remote: `make finetune` then trains nothing
	dvc pull --run-cache

# DVC's own cloud filesystems (dvc-azure, dvc-s3): the .dvc file records the source's etag and the content's
# md5; `dvc update` downloads again only when the etag changed. Credentials come from the environment
# (docs/data.md#data-in-cloud-storage), never from the command line: `dvc import-url --fs-config` would
# write them into the committed .dvc file.
# azure://: the storage account's name (not a secret) goes into the .dvc file (--fs-config account_name=...).
# Without it DVC cannot even load the import (every dvc command, `make finetune` too, then fails with
# "Authentication to Azure Blob Storage requires either account_name or connection_string") for anyone
# whose environment has no Azure credentials. Default: AZURE_STORAGE_ACCOUNT, else the connection string's.
AZURE_ACCOUNT ?= $(or $(AZURE_STORAGE_ACCOUNT),$(shell printf '%s' "$$AZURE_STORAGE_CONNECTION_STRING" \
	| sed -n 's/.*AccountName=\([^;]*\).*/\1/p'))
IMPORT_FS_CONFIG = $(if $(filter azure://%,$(URL)),--fs-config account_name=$(AZURE_ACCOUNT))
# TO defaults to data/<the URL's file name> (a ?versionid=... query dropped).
IMPORT_TO = $(or $(TO),data/$(notdir $(firstword $(subst ?, ,$(URL)))))
IMPORT_URLS := azure://?*/?*|s3://?*/?*|remote://?*/?*

import-data: env ## Track a cloud file with DVC: URL=azure://<container>/<path> (or s3://, remote://) [TO=data/<name>]
	@test -n "$(URL)" || { echo 'usage: make import-data URL=azure://<container>/<path>/<file>.jsonl [TO=data/<name>.jsonl]' >&2; exit 2; }
	@case "$(URL)" in $(IMPORT_URLS)) ;; *) echo "make import-data: unsupported URL '$(URL)': use azure://<container>/<path>, s3://<bucket>/<path> \
	or remote://<dvc remote>/<path>" >&2; exit 2 ;; esac
	@test -n "$(notdir $(IMPORT_TO))" || { echo "make import-data: URL=$(URL) ends in /: name the local copy, TO=data/<name>" >&2; exit 2; }
	@test -n "$(AZURE_ACCOUNT)" || case "$(URL)" in azure://*) echo "make import-data: no Azure storage account name: \
	set AZURE_STORAGE_ACCOUNT (or AZURE_ACCOUNT=<name>); see docs/data.md#data-in-cloud-storage" >&2; exit 2 ;; esac
	mkdir -p "$(dir $(IMPORT_TO))"
	dvc import-url $(strip "$(URL)" "$(IMPORT_TO)" $(IMPORT_FS_CONFIG))
	@echo "Imported $(URL) -> $(IMPORT_TO) (commit $(IMPORT_TO).dvc and $(dir $(IMPORT_TO)).gitignore)." \
		"Train on it: make finetune ARGS=\"data.path=$(IMPORT_TO)\"; refresh it: make update-data TO=$(IMPORT_TO)"

# Without TO: every import under data/ (a .dvc file with a deps: block; `dvc add`ed files have none).
UPDATE_TARGETS = $(if $(TO),$(patsubst %.dvc,%,$(TO)).dvc,$(shell grep -l '^deps:' data/*.dvc 2>/dev/null))

update-data: env ## Download imported data again if its source changed (TO=data/<name>; default: every import in data/)
	@test -n "$(UPDATE_TARGETS)" || { echo 'make update-data: nothing imported under data/ (make import-data URL=... first)' >&2; exit 2; }
	dvc update $(UPDATE_TARGETS)

lineage: env ## Print where the int4 model came from (or ARTIFACT=artifacts/<stage>)
	$(PY) -m slmkit.cli lineage $(ARTIFACT)

test: env ## Run the default and slow tests (the slow ones run the real pipeline)
	$(PY) -m pytest -m "not gpu" --durations=15

test-fast: env ## Run the default tests only
	$(PY) -m pytest -m "not slow and not gpu"

lint: env ## ruff (lint + format check) and hadolint (Dockerfile)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint docker/Dockerfile

IMAGE ?= slmkit:$(EXTRA)
DOCKER_VOLUMES = -v "$(CURDIR)":/workspace -v slmkit-hf-cache:/cache/huggingface -v slmkit-dvc-cache:/cache/dvc
DOCKER_RUN = docker run --rm $(DOCKER_VOLUMES) $(IMAGE)

docker-build: ## Build the image (EXTRA=cuda: CUDA 12 base; EXTRA=cpu: plain Ubuntu 22.04)
	docker build -f docker/Dockerfile --build-arg EXTRA=$(EXTRA) \
		$(if $(filter cpu,$(EXTRA)),--build-arg BASE_IMAGE=ubuntu:22.04) -t $(IMAGE) .

docker-finetune: ## Run `make finetune` inside the image (GPU: --gpus all)
	docker run --rm $(if $(filter cuda,$(EXTRA)),--gpus all) $(DOCKER_VOLUMES) $(IMAGE) \
		finetune EXTRA=$(EXTRA) ARGS="$(ARGS)"

docker-test: ## Run `make test` inside the image
	$(DOCKER_RUN) test EXTRA=$(EXTRA)

clean: ## Remove pipeline outputs (the DVC cache keeps them: `dvc checkout` restores)
	rm -rf artifacts metrics
