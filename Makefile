# One entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Set-up is redone only when one of these changes.
SETUP_STAMP := $(VENV)/.setup-$(shell cat requirements.txt requirements-dev.txt constraints.txt 2>/dev/null | cksum | cut -d' ' -f1)

# Training settings (all optional). Without a GPU the default is the quick CPU recipe.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
RECIPE ?= $(if $(HAS_GPU),h100,quickstart)
OUTPUT ?= output/$(RECIPE)
MODEL ?=
DATA ?=
TOKENIZER ?=
NPROC ?=
ZERO ?=
MAX_STEPS ?=
ARGS ?=
TRAIN_FLAGS = --config $(RECIPE) --output-dir $(OUTPUT) \
	$(if $(MODEL),--model $(MODEL)) $(if $(DATA),--data $(DATA)) $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) \
	$(if $(NPROC),--nproc $(NPROC)) $(if $(ZERO),--zero-stage $(ZERO)) $(if $(MAX_STEPS),--max-steps $(MAX_STEPS)) $(ARGS)

.PHONY: help setup train smoke test lint bench

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(SETUP_STAMP) ## Make .venv with the pinned dependencies (idempotent)

$(SETUP_STAMP): requirements.txt requirements-dev.txt constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A bare `torch` requirement would pull a multi-GB CUDA build: pin it, first.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	@rm -f $(VENV)/.setup-*; touch $@

train: setup ## Train on the built-in default (or MODEL=, DATA=, RECIPE=, NPROC=, ZERO=, ARGS=)
	$(PY) -m job train $(TRAIN_FLAGS)

smoke: setup ## Smoke-test a trained model (MODEL=folder, default the last run's final/)
	$(PY) -m job smoke --model $(or $(MODEL),$(OUTPUT)/final)

bench: setup ## Measure tokens/s, TFLOP/s and MFU of the training path (ARGS= for options)
	$(PY) -m job bench $(ARGS)

lint: setup ## ruff
	$(VENV)/bin/ruff check job tests
	$(VENV)/bin/ruff format --check job tests

test: setup ## Run the test suite (what CI runs)
	$(PY) -m pytest -q tests
