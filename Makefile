# pcr_fast — the two commands a user needs (both set themselves up on a fresh machine):
#   make demo   the main job: plain SFT vs PCR on poisoned data, table + results.json + PNG
#   make test   the test suite (Triton kernels under TRITON_INTERPRET=1 on a CPU machine);
#               one file: make test TESTS=tests/test_loss.py
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
PYTEST_ARGS ?=
TESTS ?= tests

.PHONY: all install demo test bench bench-loss bench-augment gpu-report clean

all: test

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# On a machine without an NVIDIA GPU take the CPU torch build first (seconds, from local
	# disk); an unpinned torch would pull a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==2.13.0"; fi
	$(PY) -m pip install -q -e ".[test,bench,trl]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pcr-fast demo $(DEMO_ARGS)

# The suite runs the Triton kernels under the interpreter unless a GPU is present
# (tests/conftest.py decides); the pytest executable (not `python -m pytest`) keeps the
# repository root off sys.path so `kernels/` is only ever imported as pcr_fast.kernels.
test: $(STAMP)
	$(VENV)/bin/pytest -q -ra $(PYTEST_ARGS) $(TESTS)

bench: bench-loss bench-augment

bench-loss: $(STAMP)
	$(PY) benchmarks/bench_two_view_loss.py

bench-augment: $(STAMP)
	$(PY) benchmarks/bench_patch_augment.py

# Ahead-of-time compile of every Triton kernel for sm_80/86/90/100 on this (CPU) machine:
# registers, spills, shared memory, tensor cores, occupancy -> benchmarks/results/gpu_compile_<date>.{json,md}
gpu-report: $(STAMP)
	env -u TRITON_INTERPRET $(PY) benchmarks/gpu_compile_report.py --subset full

clean:
	rm -rf $(VENV) build *.egg-info pcr_demo_out .pytest_cache
