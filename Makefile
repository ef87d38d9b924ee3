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

.PHONY: help setup train smoke test lint bench bench-gpu
.PHONY: build push docker-train docker-smoke k8s-overlays k8s-render k8s-validate k8s-pvcs k8s-prepare \
	k8s-submit k8s-multinode k8s-logs k8s-delete

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

# The GPU figures of BENCHMARKS.md in one call, under 8 minutes from a cold start on one H100/H200 (job/sweep.py):
# the CUDA tests, the lever sweep, a kernel profile of the fastest variant, the train + smoke path. On a GPU box
# without the venv: make bench-gpu PY=python3 -- when deepspeed is not importable, the wheels in GPU_WHEELS
# (../shared/gpu-wheels, else .whl/ in the repo) are installed into BENCH_SITE first (no index, no network).
# Output: stdout and BENCH_LOG/bench-gpu-<time>.log.
BENCH_LOG ?= output
BENCH_BUDGET ?= 450
BENCH_ARGS ?=
GPU_WHEELS ?= $(firstword $(wildcard ../shared/gpu-wheels .whl) ../shared/gpu-wheels)
BENCH_SITE ?= /tmp/job-gpu-site
BENCH_PATH = $(BENCH_SITE)$(if $(PYTHONPATH),:$(PYTHONPATH))
bench-gpu: $(if $(filter $(VENV)/bin/python,$(PY)),setup) ## On a GPU: CUDA tests + lever sweep + profile + train path (< 8 min)
	@PYTHONPATH=$(BENCH_PATH) $(PY) -c "import deepspeed, datasets" 2>/dev/null || { \
	  echo "installing $(GPU_WHEELS)/*.whl into $(BENCH_SITE)"; \
	  $(PY) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(BENCH_SITE) $(GPU_WHEELS)/*.whl; }
	PYTHONPATH=$(BENCH_PATH) $(PY) -m job.sweep --budget-s $(BENCH_BUDGET) --log-dir $(BENCH_LOG) $(BENCH_ARGS)

lint: setup ## ruff, hadolint on docker/Dockerfile, strict validation of the Kubernetes manifests
	$(VENV)/bin/ruff check job tests
	$(VENV)/bin/ruff format --check job tests
	$(VENV)/bin/hadolint docker/Dockerfile
	@$(MAKE) --no-print-directory k8s-validate

test: setup ## Run the test suite (what CI runs)
	$(PY) -m pytest -q tests

# ------------------------------------------------------------------ container image and Kubernetes
# k8s/README.md explains these. IMAGE:TAG names the image for build, push, docker-* and k8s-*; it is never `latest`.
IMAGE ?= ghcr.io/example/bloom-zh-job
TAG ?= $(shell git describe --tags --always --dirty 2>/dev/null || sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
BASE_IMAGE ?=
DOCKER ?= docker
CHECK_TAG = @if [ -z "$(TAG)" ] || [ "$(TAG)" = latest ]; then echo "TAG='$(TAG)': name a version, never latest" >&2; exit 2; fi

# Local GPU runs of the image: host folders mounted at the image's volumes (MODEL_DIR and DATA_DIR read-only).
# MODEL, DATA and TOKENIZER are paths inside the container (e.g. DATA=/data/news.jsonl); MODEL defaults to /models.
MODEL_DIR ?=
DATA_DIR ?=
OUTPUT_DIR ?= output/docker
CACHE_DIR ?= output/docker-cache
DOCKER_GPUS ?= all
SHM_SIZE ?= 16g
DOCKER_USER ?= $(shell id -u):$(shell id -g)
DOCKER_RUN = $(DOCKER) run --rm --init --gpus $(DOCKER_GPUS) --shm-size $(SHM_SIZE) --ulimit memlock=-1 \
	--stop-timeout 900 --user $(DOCKER_USER) -e HOME=/cache/home \
	$(if $(MODEL_DIR),-v $(abspath $(MODEL_DIR)):/models:ro) $(if $(DATA_DIR),-v $(abspath $(DATA_DIR)):/data:ro) \
	-v $(abspath $(OUTPUT_DIR)):/output -v $(abspath $(CACHE_DIR)):/cache
DOCKER_TRAIN_FLAGS = --config $(RECIPE) --output-dir /output/$(RECIPE) --resume auto \
	$(if $(MODEL),--model $(MODEL),$(if $(MODEL_DIR),--model /models)) $(if $(DATA),--data $(DATA)) \
	$(if $(TOKENIZER),--tokenizer $(TOKENIZER)) $(if $(NPROC),--nproc $(NPROC)) $(if $(ZERO),--zero-stage $(ZERO)) \
	$(if $(MAX_STEPS),--max-steps $(MAX_STEPS)) $(ARGS)

# Kubernetes. The sizes live in k8s/kustomization.yaml and k8s/multinode/kustomization.yaml; any of these set
# here overrides them through a generated overlay (in K8S_BUILD), never by editing a tracked file.
GPUS ?=
CPUS ?=
MEMORY ?=
NNODES ?=
K8S_NAMESPACE ?=
K8S_JOB ?= bloom-zh-pretrain
K8S_VERSIONS ?= 1.31.0 1.37.0
K8S_BUILD ?= output/k8s
K8S_WAIT ?= 7200
KUBECTL ?= $(firstword $(wildcard $(VENV)/bin/kubectl) kubectl)
K8S := $(KUBECTL) $(if $(K8S_NAMESPACE),--namespace $(K8S_NAMESPACE))
K8S_DEFAULT_IMAGE := ghcr.io/example/bloom-zh-job
K8S_MANIFESTS := $(filter-out %/kustomization.yaml,$(wildcard k8s/*.yaml k8s/multinode/*.yaml))
comma := ,
k8s-literals = $(subst $(eval ) ,$(comma) ,$(strip $(foreach v,$(1),$(if $($(v)),"$(v)=$($(v))"))))
# The repo root as seen from K8S_BUILD/NAME/ (kustomize takes no absolute folder paths).
K8S_ROOT = $(shell realpath -m --relative-to=$(abspath $(K8S_BUILD))/overlay $(CURDIR))
# $(call k8s-overlay,NAME,BASE,TRANSFORMERS,SETTINGS): K8S_BUILD/NAME/kustomization.yaml over BASE
define k8s-overlay
	@mkdir -p $(K8S_BUILD)/$(1)
	@{ echo 'apiVersion: kustomize.config.k8s.io/v1beta1'; echo 'kind: Kustomization'; \
	  echo '# generated by `make $@`: image and settings from make; do not edit'; \
	  echo 'resources: ["$(K8S_ROOT)/$(2)"]'; \
	  echo 'images: [{name: $(K8S_DEFAULT_IMAGE), newName: "$(IMAGE)", newTag: "$(TAG)"}]'; \
	  $(if $(call k8s-literals,$(4)),echo 'configMapGenerator: [{name: bloom-zh-settings$(comma) behavior: merge$(comma) literals: [$(call k8s-literals,$(4))]}]';) \
	  $(if $(3),echo 'transformers: [$(subst $(eval ) ,$(comma) ,$(foreach t,$(3),"$(K8S_ROOT)/$(t)"))]';) \
	} > $(K8S_BUILD)/$(1)/kustomization.yaml
endef

build: ## Build the image IMAGE:TAG from docker/Dockerfile (BASE_IMAGE= for another base)
	$(CHECK_TAG)
	$(DOCKER) build -f docker/Dockerfile -t $(IMAGE):$(TAG) $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .

push: ## Push IMAGE:TAG to its registry (after make build)
	$(CHECK_TAG)
	$(DOCKER) push $(IMAGE):$(TAG)

docker-train: ## Train in the image on this machine's GPUs (MODEL_DIR, DATA_DIR, OUTPUT_DIR, CACHE_DIR + make train's flags)
	$(CHECK_TAG)
	@mkdir -p $(OUTPUT_DIR) $(CACHE_DIR)
	$(DOCKER_RUN) $(IMAGE):$(TAG) train $(DOCKER_TRAIN_FLAGS)

docker-smoke: ## GPU check of the image: short DeepSpeed run, resume from its checkpoint, smoke-test the result
	$(CHECK_TAG)
	@mkdir -p $(OUTPUT_DIR) $(CACHE_DIR)
	rm -rf $(OUTPUT_DIR)/docker-smoke
	$(DOCKER_RUN) $(IMAGE):$(TAG) train --config quickstart --output-dir /output/docker-smoke --deepspeed /app/ds_config.json \
		--zero-stage 2 --bf16 --max-steps 20 --save-steps 10 --resume auto $(ARGS)
	$(DOCKER_RUN) $(IMAGE):$(TAG) train --config quickstart --output-dir /output/docker-smoke --deepspeed /app/ds_config.json \
		--zero-stage 2 --bf16 --max-steps 30 --save-steps 10 --resume auto $(ARGS)
	$(DOCKER_RUN) $(IMAGE):$(TAG) smoke --model /output/docker-smoke/final

k8s-overlays: ## Write the kustomize overlays for IMAGE, TAG, GPUS, CPUS, MEMORY, NNODES into K8S_BUILD
	$(CHECK_TAG)
	$(call k8s-overlay,train,k8s,k8s/settings,GPUS CPUS MEMORY)
	$(call k8s-overlay,multinode,k8s/multinode,k8s/settings k8s/multinode/settings,GPUS CPUS MEMORY NNODES)
	$(call k8s-overlay,prepare,k8s/prepare-job.yaml,,)

k8s-render: k8s-overlays ## Render the jobs to K8S_BUILD/{train,multinode,prepare}.yaml (kubectl kustomize, offline)
	@for o in train multinode prepare; do \
	  $(KUBECTL) kustomize --load-restrictor LoadRestrictionsNone $(K8S_BUILD)/$$o > $(K8S_BUILD)/$$o.yaml || exit 1; \
	  echo "rendered $(K8S_BUILD)/$$o.yaml"; done

k8s-validate: setup ## Strict schema validation of k8s/ and its renderings against K8S_VERSIONS (offline)
	@for v in $(K8S_VERSIONS); do \
	  $(VENV)/bin/kubernetes-validate --strict --quiet -k $$v $(K8S_MANIFESTS) || exit 1; \
	  echo "k8s manifests: valid (strict) for Kubernetes $$v"; done
	@if command -v $(KUBECTL) > /dev/null; then \
	  $(MAKE) --no-print-directory k8s-render && for v in $(K8S_VERSIONS); do \
	    $(VENV)/bin/kubernetes-validate --strict --quiet -k $$v $(K8S_BUILD)/train.yaml $(K8S_BUILD)/multinode.yaml \
	      $(K8S_BUILD)/prepare.yaml || exit 1; \
	    echo "kustomize renderings: valid (strict) for Kubernetes $$v"; done; \
	else echo "no kubectl: renderings not checked here (tests/test_deploy.py renders them without it)"; fi

k8s-pvcs: ## Create the data, models, output and cache claims (k8s/pvcs.yaml; never deleted by make)
	$(K8S) apply -f k8s/pvcs.yaml

k8s-prepare: k8s-render k8s-pvcs ## Run the CPU prepare Job (k8s/prepare-job.yaml) and wait for it
	$(K8S) delete job bloom-zh-prepare --ignore-not-found
	$(K8S) apply -f $(K8S_BUILD)/prepare.yaml
	@end=$$((SECONDS + $(K8S_WAIT))); while :; do \
	  s=$$($(K8S) get job bloom-zh-prepare -o jsonpath='{.status.conditions[?(@.status=="True")].type}'); \
	  case "$$s" in *Complete*) echo "prepare: complete"; break;; \
	    *Failed*) $(K8S) logs job/bloom-zh-prepare --tail=30; echo "prepare: failed" >&2; exit 1;; esac; \
	  [ $$SECONDS -lt $$end ] || { echo "prepare: still running after $(K8S_WAIT) s" >&2; exit 1; }; sleep 10; done

k8s-submit: k8s-render k8s-pvcs ## Submit the single-node training Job (IMAGE, TAG, GPUS, CPUS, MEMORY, K8S_NAMESPACE)
	$(K8S) apply -f $(K8S_BUILD)/train.yaml
	@echo "follow it: make k8s-logs; stop it (it checkpoints first): make k8s-delete"

k8s-multinode: k8s-render k8s-pvcs ## Submit the multi-node Indexed Job + headless Service (NNODES, GPUS per node, ...)
	$(K8S) apply -f $(K8S_BUILD)/multinode.yaml
	@echo "follow it: make k8s-logs K8S_JOB=bloom-zh-pretrain-mn"

k8s-logs: ## Follow the logs of every pod and container of K8S_JOB (default bloom-zh-pretrain)
	$(K8S) logs --follow --prefix --all-containers --max-log-requests 64 --tail -1 \
		--selector batch.kubernetes.io/job-name=$(K8S_JOB)

k8s-delete: ## Delete the jobs and the Service (pods checkpoint on SIGTERM; the claims and their data stay)
	$(K8S) delete job,service --selector app.kubernetes.io/part-of=bloom-zh --ignore-not-found
