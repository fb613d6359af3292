# imgflow — every target does its own set-up on a fresh machine (venv, pinned deps, data package).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export HF_HUB_OFFLINE := 1
PIP_FILTER := grep -v "^WARNING: Location" || true

.PHONY: help setup data demo test test-all test-gpu lint docs format bench clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# The lock is installed by uv (its own pin is in the lock); when uv cannot be had or fails, by pip: the
# same pins either way. INSTALLER=pip forces pip. --compile-bytecode: this environment sets
# PYTHONDONTWRITEBYTECODE=1, and without .pyc files every import is 3-4x slower.
INSTALLER ?= uv
UV_PIN := $(shell grep -E '^uv==' requirements.lock)
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if [ "$(INSTALLER)" = uv ] && $(BIN)/python -m pip install -q --disable-pip-version-check "$(UV_PIN)" 2>&1 | { $(PIP_FILTER); } \
	    && echo "installing requirements.lock with $$($(BIN)/uv --version)" \
	    && $(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -q -r requirements.lock \
	    && $(BIN)/uv pip install --python $(BIN)/python --no-deps -q -e .; then :; \
	else \
	  echo "installing requirements.lock with pip"; \
	  $(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock 2>&1 | { $(PIP_FILTER); }; \
	  $(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | { $(PIP_FILTER); }; \
	fi
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the pinned lock + imgflow (editable)

data:  ## install the Debian package dataset-fashion-mnist when it is missing and apt is available
	@if [ -f $(FMNIST) ]; then echo "Fashion-MNIST present: $(dir $(FMNIST))"; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else echo "apt-get not available: imgflow will download Fashion-MNIST (checksummed) on first ingest"; fi

demo: setup data  ## run the whole pipeline on full Fashion-MNIST (60k/10k), then list the registered models
	$(BIN)/imgflow pipeline
	$(BIN)/imgflow models

test: setup data  ## run the default test suite (no slow tests)
	$(BIN)/python -m pytest

test-all: setup data  ## run every test, slow ones included
	$(BIN)/python -m pytest -m "not gpu"

test-gpu: setup data  ## the GPU path on a CUDA machine: gpu-marked tests, then the GPU benchmark (bench/results/gpu.json)
	$(BIN)/python -m pytest -m gpu -p no:cacheprovider
	$(BIN)/python -m bench gpu

lint: setup  ## ruff (lint + format check) and mypy on components/
	$(BIN)/ruff check components tasks flows tests bench
	$(BIN)/ruff format --check components tasks flows tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

docs: setup  ## build the user guide (MkDocs Material) into site/, failing on any warning
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: it hides the warnings --strict fails on

format: setup  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix components tasks flows tests bench
	$(BIN)/ruff format components tasks flows tests bench

clean:  ## remove pipeline outputs and local state (data/, outputs/, .imgflow/)
	rm -rf data outputs .imgflow

bench: setup data  ## benchmarks: JSON in bench/results/, a table on stdout (ratios vs same-run baselines)
	$(BIN)/python -m bench

.PHONY: ui ui-stop
ui: setup  ## Prefect + MLflow servers on 127.0.0.1 for this folder; prints both URLs (PREFECT_PORT, MLFLOW_PORT)
	scripts/ui.sh start

ui-stop:  ## stop exactly the servers `make ui` started (PIDs in .imgflow/ui/pids)
	scripts/ui.sh stop
