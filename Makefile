# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EFFRUN := $(VENV)/bin/effrun
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/effrun/torch_extensions
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
PYTEST_ARGS ?=

.PHONY: install assets tools demo test test-fast bench dist clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machine: the pinned CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

assets: install
	$(EFFRUN) fetch

# what some techniques' tests need from Debian, npm and PyPI wheel files (Chromium + wabt +
# onnxruntime-web, espeak-ng, the hls4ml headers): idempotent; one that cannot install leaves its
# tests skipping with the reason
tools: install
	@for s in scripts/setup/*.sh; do bash $$s || echo "warning: $$s failed; the tests that need it will skip"; done

demo: assets
	$(EFFRUN) train +technique=paca model=smollm2-135m data=shakespeare data.seq_len=128 data.batch_size=4 run.max_steps=8 run.warmup_steps=2 run.eval_at_start=true

# two phases: the tests on 2 workers (one file per worker at a time), then the `serial` ones alone
# (tests/conftest.py says which and why); TEST_WORKERS=0 runs everything in one process
TEST_WORKERS ?= 2
test: assets tools
	$(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile -m "not serial" $(PYTEST_ARGS) tests
	$(PY) -m pytest -q -x -m serial $(PYTEST_ARGS) tests

test-fast: assets tools
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

bench: assets
	$(PY) scripts/bench_overhead.py

# a wheel that carries configs/ and recipes/ (effrun._configs): `pip install dist/effrun-*.whl`
dist: install
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	rm -rf build

clean:
	rm -rf outputs multirun build dist
