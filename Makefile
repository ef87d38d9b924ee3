# One entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# torch's version is set once, in docker/Dockerfile (ARG TORCH_VERSION), and read from there.
TORCH_VERSION ?= $(shell sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile)
# Without a GPU, torch's CPU build (+cpu, about 200 MB) from PyTorch's CPU index: PyPI's Linux torch is a CUDA
# build (2.7 GB with its nvidia-* wheels). An extra index, so a local wheel (pip's find-links) satisfies the pin
# as well, and an unreachable index is only a warning. macOS wheels carry no +cpu: PyPI's build is the CPU one.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIN = $(if $(HAS_GPU)$(filter-out Linux,$(shell uname -s)),torch==$(TORCH_VERSION),\
	--extra-index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION)+cpu)
# Set-up is redone only when one of these changes.
SETUP_REQUIREMENTS := requirements.txt requirements-dev.txt requirements-wandb.txt requirements-mlflow.txt constraints.txt
SETUP_STAMP := $(VENV)/.setup-$(shell cat $(SETUP_REQUIREMENTS) 2>/dev/null | cksum | cut -d' ' -f1)

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
# $(call train-flags,OUTPUT_DIR,DEFAULT_MODEL): the flags of `make train` and `make docker-train` (one list).
train-flags = --config $(RECIPE) --output-dir $(1) $(or $(if $(MODEL),--model $(MODEL)),$(2)) \
	$(if $(DATA),--data $(DATA)) $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) $(if $(NPROC),--nproc $(NPROC)) \
	$(if $(ZERO),--zero-stage $(ZERO)) $(if $(MAX_STEPS),--max-steps $(MAX_STEPS)) $(ARGS)

.PHONY: help setup train smoke test test-fast test-random lint bench bench-gpu
.PHONY: build push docker-train docker-smoke k8s-overlays k8s-render k8s-validate k8s-pvcs k8s-prepare \
	k8s-submit k8s-multinode k8s-trainjob k8s-logs k8s-delete k8s-claims k8s-fetch k8s-volume-permissions

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(SETUP_STAMP) ## Make .venv with the pinned dependencies (idempotent)

$(SETUP_STAMP): $(SETUP_REQUIREMENTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A bare `torch` requirement would pull a multi-GB CUDA build: pin it, first (TORCH_PIN, below).
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	@rm -f $(VENV)/.setup-*; touch $@

train: setup ## Train on the built-in default (or MODEL=, DATA=, RECIPE=, NPROC=, ZERO=, ARGS=)
	$(PY) -m job train $(call train-flags,$(OUTPUT))

smoke: setup ## Smoke-test a trained model (MODEL=folder, default the last run's final/)
	$(PY) -m job smoke --model $(or $(MODEL),$(OUTPUT)/final)

bench: setup ## Measure tokens/s, TFLOP/s and MFU of the training path (ARGS= for options)
	$(PY) -m job bench $(ARGS)

# The GPU figures of BENCHMARKS.md in one call, under 8 minutes from a cold start on one H100/H200 (tools/gpu_sweep.py):
# the CUDA tests, the memory plan against the measured peak (389m, 800m), the lever sweep, a kernel profile of the
# fastest variant, the train + smoke path. On a GPU box without the venv: make bench-gpu PY=python3 -- when deepspeed
# is not importable, the wheels in GPU_WHEELS (../shared/gpu-wheels, else .whl/ in the repo) are installed into
# BENCH_SITE first (no index, no network).
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
	PYTHONPATH=$(BENCH_PATH) $(PY) -m tools.gpu_sweep --budget-s $(BENCH_BUDGET) --log-dir $(BENCH_LOG) $(BENCH_ARGS)

lint: setup ## ruff, hadolint on docker/Dockerfile, strict validation of the Kubernetes manifests
	$(VENV)/bin/ruff check job tests k8s tools
	$(VENV)/bin/ruff format --check job tests k8s tools
	$(VENV)/bin/hadolint docker/Dockerfile
	@$(MAKE) --no-print-directory k8s-validate

# Two test files at a time (pytest-xdist): the suite waits on process start-ups as much as it computes, so on 2 cores two
# workers ran it 1.67x faster than one (fresh clones, the same 443 tests: 15 min 14 s -> 9 min 08 s). --dist loadfile
# keeps each file whole on one worker, in its written order: a failure repeats with `pytest tests/test_<file>.py`.
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)
test: setup ## Run the whole test suite (what CI runs; TEST_WORKERS=2 files at a time)
	$(PY) -m pytest -q $(XDIST) tests

# The suite in a random order (pytest-randomly; SEED=N repeats an order, the header prints the seed): no test may
# depend on what another left behind. Files are shuffled and so are the tests inside each; with TEST_WORKERS=0 one
# process runs them in exactly the seed's order.
SEED ?=
test-random: setup ## The whole suite in a random order (SEED= to repeat one; the seed is printed first)
	$(PY) -m pytest -o addopts=-ra $(XDIST) $(if $(SEED),--randomly-seed=$(SEED)) tests

test-fast: setup ## The unit tests only, for your own loop (under two minutes; no training runs or launches)
	$(PY) -m pytest -q $(XDIST) -m "not slow" tests

# ------------------------------------------------------------------ container image and Kubernetes
# k8s/README.md explains these. IMAGE:TAG names the image for build, push, docker-* and k8s-*; it is never `latest`.
# The default is the reference every k8s/ manifest names, RELEASE_IMAGE = ghcr.io/<owner>/<repo>:VERSION, VERSION
# being pyproject.toml's: the image .github/workflows/release.yml publishes for the git tag vVERSION (it refuses a
# tag that differs from pyproject.toml). tests/test_release.py holds the manifests, this and the workflow equal.
# Any commit pushed to main is published as sha-<first 7 hex digits> too: TAG=sha-... runs that commit's image.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
RELEASE_IMAGE := $(shell sed -n 's/^ *image: *\([^ ]*\).*/\1/p' k8s/job.yaml | head -1)
IMAGE ?= $(patsubst %:$(VERSION),%,$(RELEASE_IMAGE))
TAG ?= $(VERSION)
# The engine of build and push: podman or docker, whichever is installed (podman first).
ENGINE ?= $(or $(notdir $(shell command -v podman 2>/dev/null)),docker)
# Build arguments of docker/Dockerfile, passed only when set here (TORCH_INDEX_URL= empty means: torch from the
# wheelhouse): BASE_IMAGE, TORCH_INDEX_URL, TORCH_CUDA (required|no), PIP_INDEX_URL (a mirror), WHEELHOUSE_IMAGE.
# WHEELHOUSE=DIR: wheels from a folder (air-gapped; buildx or podman). PIP_CERT_FILE: a CA bundle for the index,
# as a build secret (never in a layer). BUILD_NETWORK=host where the engine's own network has no route out.
# podman: Docker's image format (OCI has no SHELL, which the Dockerfile uses), runc when installed (crun fails
# on hosts with hybrid cgroups). docker: BuildKit (RUN --mount), built in since 18.09, the only builder since 23.
BUILD_ARG_NAMES := BASE_IMAGE TORCH_INDEX_URL TORCH_CUDA TRACKING PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_NO_INDEX \
	WHEELHOUSE_IMAGE
WHEELHOUSE ?=
PIP_CERT_FILE ?=
BUILD_NETWORK ?=
BUILD_OPTS ?=
comma := ,
BUILD_ARGS = $(foreach v,$(BUILD_ARG_NAMES),$(if $(filter-out undefined,$(origin $(v))),--build-arg $(v)=$($(v)))) \
	$(if $(WHEELHOUSE),--build-context wheelhouse=$(WHEELHOUSE)) \
	$(if $(PIP_CERT_FILE),--secret id=pip-cert$(comma)src=$(PIP_CERT_FILE)) \
	$(if $(BUILD_NETWORK),--network $(BUILD_NETWORK)) \
	$(if $(filter podman,$(ENGINE)),--format docker $(if $(shell command -v runc 2>/dev/null),--runtime runc)) $(BUILD_OPTS)
# The GPU runs of the image (docker-train, docker-smoke) need Docker with the NVIDIA Container Toolkit.
DOCKER ?= docker
CHECK_TAG = @if [ -z "$(TAG)" ] || [ "$(TAG)" = latest ]; then echo "TAG='$(TAG)': name a version, never latest" >&2; exit 2; fi
# OCI labels of the image (the release workflow passes the same from its checkout).
IMAGE_LABELS = --build-arg VERSION=$(TAG) --build-arg REVISION=$(shell git rev-parse HEAD 2>/dev/null) \
	--build-arg CREATED=$(shell date -u +%Y-%m-%dT%H:%M:%SZ) \
	$(if $(filter ghcr.io/%,$(IMAGE)),--build-arg SOURCE=https://github.com/$(patsubst ghcr.io/%,%,$(IMAGE)))

# Local GPU runs of the image: host folders mounted at the image's volumes (MODEL_DIR and DATA_DIR read-only).
# MODEL, DATA and TOKENIZER are paths inside the container (e.g. DATA=/data/news.jsonl); MODEL defaults to /models.
MODEL_DIR ?=
DATA_DIR ?=
OUTPUT_DIR ?= output/docker
CACHE_DIR ?= output/docker-cache
DOCKER_GPUS ?= all
SHM_SIZE ?= 16g
DOCKER_USER ?= $(shell id -u):$(shell id -g)
DOCKER_RUN = $(DOCKER) run --rm --gpus $(DOCKER_GPUS) --shm-size $(SHM_SIZE) --ulimit memlock=-1 \
	--stop-timeout 900 --user $(DOCKER_USER) \
	$(if $(MODEL_DIR),-v $(abspath $(MODEL_DIR)):/models:ro) $(if $(DATA_DIR),-v $(abspath $(DATA_DIR)):/data:ro) \
	-v $(abspath $(OUTPUT_DIR)):/output -v $(abspath $(CACHE_DIR)):/cache

# Kubernetes. The sizes live in the kustomization.yaml of k8s/, k8s/jobset/, k8s/indexed/ and k8s/trainjob/; any
# of these set here overrides them through an overlay that k8s/overlay.py writes into K8S_BUILD, never by editing
# a tracked file. The K8S_QUEUE ... K8S_RDMA settings each switch on a component of k8s/components/.
GPUS ?=
CPUS ?=
MEMORY ?=
NNODES ?=
K8S_QUEUE ?=
K8S_KUEUE_PRIORITY ?=
K8S_PRIORITY_CLASS ?=
K8S_GPU_PRODUCT ?=
K8S_TOLERATE ?=
K8S_PULL_SECRET ?=
K8S_RDMA ?=
MULTINODE ?= jobset
# The claims (k8s/pvcs.yaml) as this cluster needs them: its storage class (empty: the default class) and access
# mode. Several nodes mount every claim: multi-node targets refuse claims that are not ReadWriteMany.
K8S_STORAGE_CLASS ?=
K8S_ACCESS_MODE ?= ReadWriteOnce
# Prepare pods at once: all of them (completions) on ReadWriteMany claims, else one at a time (pods on two nodes
# cannot share a ReadWriteOnce claim). `make k8s-prepare` checks the claims against it before applying anything.
K8S_PREPARE_PARALLELISM ?= $(if $(filter ReadWriteMany,$(K8S_ACCESS_MODE)),$(shell sed -n 's/^  completions: *//p' k8s/prepare-job.yaml),1)
K8S_RUN ?= run
K8S_NAMESPACE ?=
K8S_SELECTOR ?= batch.kubernetes.io/job-name=bloom-zh-pretrain
K8S_VERSIONS ?= 1.31.0 1.37.0
K8S_BUILD ?= output/k8s
K8S_WAIT ?= 7200
KUBECTL ?= $(VENV)/bin/kubectl
K8S := $(KUBECTL) $(if $(K8S_NAMESPACE),--namespace $(K8S_NAMESPACE))
K8S_MANIFESTS := $(filter-out %/kustomization.yaml %/kustomizeconfig.yaml,$(wildcard k8s/*.yaml k8s/indexed/*.yaml k8s/jobset/*.yaml \
	k8s/trainjob/*.yaml))
K8S_SETTINGS = 'GPUS=$(GPUS)' 'CPUS=$(CPUS)' 'MEMORY=$(MEMORY)' 'NNODES=$(NNODES)' 'QUEUE=$(K8S_QUEUE)' \
	'KUEUE_PRIORITY=$(K8S_KUEUE_PRIORITY)' 'PRIORITY_CLASS=$(K8S_PRIORITY_CLASS)' 'GPU_PRODUCT=$(K8S_GPU_PRODUCT)' \
	'TOLERATE=$(K8S_TOLERATE)' 'PULL_SECRET=$(K8S_PULL_SECRET)' 'RDMA=$(K8S_RDMA)' 'PARALLELISM=$(K8S_PREPARE_PARALLELISM)'
# The overlays: NAME = base [settings transformers re-run after the merge]
K8S_OVERLAYS := train jobset indexed trainjob prepare
k8s-base.train := k8s k8s/settings
k8s-base.jobset := k8s/jobset k8s/jobset/settings
k8s-base.indexed := k8s/indexed k8s/settings k8s/indexed/settings
k8s-base.trainjob := k8s/trainjob k8s/trainjob/settings
k8s-base.prepare := k8s/prepare-job.yaml k8s/prepare-settings
K8S_RENDERED = $(foreach o,$(K8S_OVERLAYS),$(K8S_BUILD)/$(o).yaml)
# Tools applied once, not workloads of the job (validated with them).
K8S_ONCE := k8s/volume-permissions/job.yaml
# `make lint` also renders with every component on, into this folder, and validates that too.
K8S_ALL_COMPONENTS = K8S_BUILD=$(K8S_BUILD)/components K8S_QUEUE=team-a K8S_KUEUE_PRIORITY=high \
	K8S_PRIORITY_CLASS=training K8S_GPU_PRODUCT=NVIDIA-H100-80GB-HBM3 K8S_TOLERATE=dedicated K8S_PULL_SECRET=ghcr-pull \
	K8S_RDMA=1

build: ## Build IMAGE:TAG from docker/Dockerfile with ENGINE (podman|docker; BASE_IMAGE=, TORCH_INDEX_URL=, ...)
	$(CHECK_TAG)
	$(if $(filter docker %/docker,$(ENGINE)),DOCKER_BUILDKIT=1) $(ENGINE) build -f docker/Dockerfile -t $(IMAGE):$(TAG) \
		$(IMAGE_LABELS) $(BUILD_ARGS) .

.PHONY: image-test
image-test: ## Build the CPU image here (local base, torch from WHEELS) and test it in the container (ENGINE=podman|docker)
	ENGINE=$(if $(filter command line environment,$(origin ENGINE)),$(ENGINE),podman) docker/image-test.sh

# Every workload's pod template, rendered as k8s-render renders it plus the CI-only patches of k8s/ci/NAME (sizes
# and steps: tiny model, 40 steps, no GPU limits), run as a kubelet would in containers of the image-test image
# (tools/cluster_test.py; k8s/README.md, "What make cluster-test runs"). CLUSTER_CASES= some of prepare train
# jobset trainjob indexed; REPLACE_DELAY_S: when the Indexed Job's replacement pod arrives.
CLUSTER_IMAGE ?= localhost/bloom-zh-job:test
CLUSTER_CASES ?=
REPLACE_DELAY_S ?= 30
K8S_CI_BUILD ?= output/k8s-ci
.PHONY: cluster-test
cluster-test: setup ## Run every manifest's pods in containers of the image-test image (multi-node on a podman network)
	BUILD_ONLY=1 IMAGE=$(CLUSTER_IMAGE) ENGINE=podman docker/image-test.sh
	@$(MAKE) --no-print-directory k8s-render K8S_BUILD=$(K8S_CI_BUILD) IMAGE=$(firstword $(subst :, ,$(CLUSTER_IMAGE))) \
		TAG=$(lastword $(subst :, ,$(CLUSTER_IMAGE))) GPUS=1 CPUS=1 MEMORY=6Gi NNODES=2 \
		$(foreach o,$(K8S_OVERLAYS),'k8s-base.$(o)=$(k8s-base.$(o)) k8s/ci/$(o)')
	$(PY) -m tools.cluster_test --rendered $(K8S_CI_BUILD) --image $(CLUSTER_IMAGE) --work output/cluster-test \
		--replace-delay-s $(REPLACE_DELAY_S) $(CLUSTER_CASES)

push: ## Push IMAGE:TAG to its registry with ENGINE (after make build)
	$(CHECK_TAG)
	$(ENGINE) push $(IMAGE):$(TAG)

docker-train: ## Train in the image on this machine's GPUs (MODEL_DIR, DATA_DIR, OUTPUT_DIR, CACHE_DIR + make train's flags)
	$(CHECK_TAG)
	@mkdir -p $(OUTPUT_DIR) $(CACHE_DIR)
	$(DOCKER_RUN) $(IMAGE):$(TAG) train $(call train-flags,/output/$(RECIPE),$(if $(MODEL_DIR),--model /models)) --resume auto

docker-smoke: ## GPU check of the image: short DeepSpeed run, resume from its checkpoint, smoke-test the result
	$(CHECK_TAG)
	@mkdir -p $(OUTPUT_DIR) $(CACHE_DIR)
	rm -rf $(OUTPUT_DIR)/docker-smoke
	$(DOCKER_RUN) $(IMAGE):$(TAG) train --config quickstart --output-dir /output/docker-smoke --deepspeed default \
		--zero-stage 2 --bf16 --max-steps 20 --save-steps 10 --resume auto $(ARGS)
	$(DOCKER_RUN) $(IMAGE):$(TAG) train --config quickstart --output-dir /output/docker-smoke --deepspeed default \
		--zero-stage 2 --bf16 --max-steps 30 --save-steps 10 --resume auto $(ARGS)
	$(DOCKER_RUN) $(IMAGE):$(TAG) smoke --model /output/docker-smoke/final

k8s-overlays: ## Write the kustomize overlays (IMAGE, TAG, GPUS, ..., K8S_QUEUE, ...) into K8S_BUILD
	$(CHECK_TAG)
	@$(foreach o,$(K8S_OVERLAYS),$(PYTHON) k8s/overlay.py $(K8S_BUILD)/$(o) $(firstword $(k8s-base.$(o))) $(IMAGE):$(TAG) \
		--released $(RELEASE_IMAGE) \
		$(foreach t,$(wordlist 2,9,$(k8s-base.$(o))),--transformer $(t)) $(K8S_SETTINGS) &&) true

k8s-render: k8s-overlays $(if $(filter $(VENV)/bin/kubectl,$(KUBECTL)),setup) ## Render every job to K8S_BUILD/NAME.yaml (offline)
	@for o in $(K8S_OVERLAYS); do \
	  $(KUBECTL) kustomize --load-restrictor LoadRestrictionsNone $(K8S_BUILD)/$$o > $(K8S_BUILD)/$$o.yaml || exit 1; \
	  echo "rendered $(K8S_BUILD)/$$o.yaml"; done

k8s-validate: setup ## Strict validation of k8s/ and its renderings (K8S_VERSIONS; JobSet/TrainJob: k8s/schemas)
	@$(MAKE) --no-print-directory k8s-render > /dev/null
	@$(MAKE) --no-print-directory k8s-render $(K8S_ALL_COMPONENTS) > /dev/null
	@for v in $(K8S_VERSIONS); do \
	  $(VENV)/bin/kubernetes-validate --strict --quiet -k $$v $(K8S_MANIFESTS) $(K8S_ONCE) $(K8S_RENDERED) \
	    $(subst $(K8S_BUILD)/,$(K8S_BUILD)/components/,$(K8S_RENDERED)) 2>&1 | grep -v "Couldn't find schema for kind \(JobSet\|TrainJob\|TrainingRuntime\)"; \
	  [ $${PIPESTATUS[0]} -eq 0 ] || exit 1; echo "k8s manifests and renderings: valid (strict) for Kubernetes $$v"; done
	$(PY) k8s/crd_validate.py $(K8S_MANIFESTS) $(K8S_RENDERED) $(subst $(K8S_BUILD)/,$(K8S_BUILD)/components/,$(K8S_RENDERED))

k8s-claims: setup ## Render the claims with K8S_STORAGE_CLASS and K8S_ACCESS_MODE into K8S_BUILD/pvcs.yaml
	@mkdir -p $(K8S_BUILD)
	$(PY) -m tools.k8s_claims --render k8s/pvcs.yaml --access-mode $(K8S_ACCESS_MODE) \
		$(if $(K8S_STORAGE_CLASS),--storage-class $(K8S_STORAGE_CLASS)) > $(K8S_BUILD)/pvcs.yaml

# Before anything is applied: the claims that exist and those about to be, against the node count.
K8S_CHECK_CLAIMS = $(K8S) get pvc -l app.kubernetes.io/part-of=bloom-zh -o json | \
	$(PY) -m tools.k8s_claims --nodes $(1) $(K8S_BUILD)/pvcs.yaml -

k8s-pvcs: k8s-claims ## Create the data, models, output and cache claims (never deleted by make)
	$(K8S) apply -f $(K8S_BUILD)/pvcs.yaml

k8s-prepare: k8s-render k8s-claims ## Run the CPU prepare Job (k8s/prepare-job.yaml; K8S_PREPARE_PARALLELISM pods at once) and wait
	@$(call K8S_CHECK_CLAIMS,$(K8S_PREPARE_PARALLELISM))
	$(K8S) apply -f $(K8S_BUILD)/pvcs.yaml
	$(K8S) delete job bloom-zh-prepare --ignore-not-found
	$(K8S) apply -f $(K8S_BUILD)/prepare.yaml
	@end=$$((SECONDS + $(K8S_WAIT))); while :; do \
	  s=$$($(K8S) get job bloom-zh-prepare -o jsonpath='{.status.conditions[?(@.status=="True")].type}'); \
	  case "$$s" in *Complete*) echo "prepare: complete"; break;; \
	    *Failed*) $(K8S) logs job/bloom-zh-prepare --tail=30; echo "prepare: failed" >&2; exit 1;; esac; \
	  [ $$SECONDS -lt $$end ] || { echo "prepare: still running after $(K8S_WAIT) s" >&2; exit 1; }; sleep 10; done

k8s-volume-permissions: $(if $(filter $(VENV)/bin/kubectl,$(KUBECTL)),setup) ## Once, where RWX volumes ignore fsGroup: claims' roots to uid 1000
	$(CHECK_TAG)
	@$(PYTHON) k8s/overlay.py $(K8S_BUILD)/volume-permissions $(K8S_ONCE) $(IMAGE):$(TAG) --released $(RELEASE_IMAGE) \
		'PULL_SECRET=$(K8S_PULL_SECRET)'
	$(KUBECTL) kustomize --load-restrictor LoadRestrictionsNone $(K8S_BUILD)/volume-permissions > $(K8S_BUILD)/volume-permissions.yaml
	$(K8S) delete job bloom-zh-volume-permissions --ignore-not-found
	$(K8S) apply -f $(K8S_BUILD)/volume-permissions.yaml
	@$(K8S) wait --for=condition=complete --timeout=300s job/bloom-zh-volume-permissions > /dev/null; rc=$$?; \
	  $(K8S) logs job/bloom-zh-volume-permissions; exit $$rc

k8s-submit: k8s-render k8s-pvcs ## Submit the single-node training Job (IMAGE, TAG, GPUS, CPUS, MEMORY, K8S_QUEUE, ...)
	$(K8S) apply -f $(K8S_BUILD)/train.yaml
	@echo "follow it: make k8s-logs; stop it (it checkpoints first): make k8s-delete"

k8s-multinode: k8s-render k8s-claims ## Submit multi-node training: a JobSet (MULTINODE=indexed: Indexed Job + Service)
	@case "$(MULTINODE)" in jobset|indexed) ;; *) echo "MULTINODE=$(MULTINODE): use jobset or indexed" >&2; exit 2;; esac
	@$(call K8S_CHECK_CLAIMS,$(or $(NNODES),2))
	$(K8S) apply -f $(K8S_BUILD)/pvcs.yaml
	$(K8S) apply -f $(K8S_BUILD)/$(MULTINODE).yaml
	@echo "follow it: make k8s-logs K8S_SELECTOR=$(if $(filter jobset,$(MULTINODE)),jobset.sigs.k8s.io/jobset-name=bloom-zh-pretrain-js,batch.kubernetes.io/job-name=bloom-zh-pretrain-mn)"

k8s-trainjob: k8s-render k8s-claims ## Submit the Kubeflow TrainJob on the project's runtime (NNODES, GPUS per node, ...)
	@$(call K8S_CHECK_CLAIMS,$(or $(NNODES),2))
	$(K8S) apply -f $(K8S_BUILD)/pvcs.yaml
	$(K8S) apply -f $(K8S_BUILD)/trainjob.yaml
	@echo "follow it: make k8s-logs K8S_SELECTOR=jobset.sigs.k8s.io/jobset-name=bloom-zh-pretrain-tj"

k8s-fetch: ## Copy final/, the report and the metrics of K8S_RUN (run, run-multinode, run-trainjob) from the output claim
	$(CHECK_TAG)
	$(PY) -m tools.k8s_fetch --image $(IMAGE):$(TAG) --run $(K8S_RUN) --kubectl "$(KUBECTL)" \
		$(if $(K8S_NAMESPACE),--namespace $(K8S_NAMESPACE)) $(if $(K8S_PULL_SECRET),--pull-secret $(K8S_PULL_SECRET))

k8s-logs: ## Follow the logs of every pod and container that K8S_SELECTOR selects (default: the single-node Job)
	$(K8S) logs --follow --prefix --all-containers --max-log-requests 64 --tail -1 --selector $(K8S_SELECTOR)

k8s-delete: ## Delete the jobs, JobSets, TrainJobs and the Service (pods checkpoint on SIGTERM; the claims stay)
	$(K8S) delete job,service --selector app.kubernetes.io/part-of=bloom-zh --ignore-not-found
	@for kind in jobsets.jobset.x-k8s.io trainjobs.trainer.kubeflow.org; do \
	  if $(K8S) api-resources -o name | grep -qx $$kind; then \
	    $(K8S) delete $$kind --selector app.kubernetes.io/part-of=bloom-zh --ignore-not-found || exit 1; fi; done
