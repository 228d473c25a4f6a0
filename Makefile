# `make test` and `make demo` work on a fresh clone: they create .venv on first use.
# torch goes in first and pinned, so that the later install finds it satisfied instead of
# pulling the newest build (several GB of CUDA packages) through diffusers. Everything else
# comes pinned from requirements-dev.lock, so that a fresh clone installs what CI tested.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
LOCK := requirements-dev.lock

.PHONY: demo test test-fast lint format schemas bench gpu-wheels lock clean

$(BIN)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $$(grep '^pip==' $(LOCK))
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --requirement $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	$(BIN)/python -m pip check
	touch $@

# Resolves pyproject.toml's ranges afresh in a scratch venv and pins the result.
lock:
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --quiet --upgrade pip
	build/lock-venv/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	build/lock-venv/bin/python -m pip install --quiet --editable '.[embedded,dev]'
	{ sed -n '/^#/p' $(LOCK); \
	  build/lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v '^torch=='; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf build/lock-venv

demo: $(BIN)/.installed
	$(BIN)/imagegen demo

test: $(BIN)/.installed lint
	$(BIN)/pytest

# Everything that needs neither the broker nor the object store: about a minute.
test-fast: $(BIN)/.installed
	$(BIN)/pytest -m "not integration"

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/typecheck.py
	$(BIN)/hadolint Dockerfile
	$(BIN)/python .ci/validate_manifests.py

format: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Start-up, intake, render, end-to-end, overload and gateway benchmarks; writes bench/results.json and docs/benchmarks.md.
# BENCH_QUICK=1 for a run of a few minutes; ARGS=--gpu (or BENCH_GPU=1) renders on CUDA.
bench: $(BIN)/.installed
	$(BIN)/python -m bench $(ARGS)

# For a GPU machine that cannot reach a package index: what it lacks for the GPU benchmark
# (bench/gpu-wheels.txt), as wheels for its Python (GPU_PYTHON), into .whl/. README,
# "Benchmarks on a GPU machine", says how to install and run them there.
GPU_PYTHON ?= 3.12
GPU_PLATFORMS := manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
		--python-version $(GPU_PYTHON) --implementation cp \
		$(foreach platform,$(GPU_PLATFORMS),--platform $(platform)_x86_64) \
		--requirement bench/gpu-wheels.txt

schemas: $(BIN)/.installed
	$(BIN)/python -m imagegen.schemas.export

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache .mypy_cache .hypothesis
