# The two commands of the README:  `make demo`  and  `make test`.
# Everything else here is what they are made of.

PYTHON      ?= python3
VENV        ?= .venv
UV_VERSION  ?= 0.13.9
# Where the CPU build of torch 2.13.0 (pinned in requirements.lock) is found. On machines without
# this folder, point it at a wheel folder or index that carries torch==2.13.0+cpu.
TORCH_WHEELS ?= /opt/wheels
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test check test-all setup lock down clean bench

demo: setup  ## Run the whole lifecycle on the bundled sample and leave the model answering.
	$(BIN)/lifecycle run

test: check  ## Layer contracts, lint, types, then the test suite (what CI runs).
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

check: setup  ## Layer contracts (import-linter), lint (ruff) and types (mypy); settings in pyproject.toml.
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/mypy

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode \
		$(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS)) -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

lock:  ## Re-resolve requirements.lock from pyproject.toml.
	$(BIN)/uv pip compile pyproject.toml --extra test --python-version 3.11 \
		$(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS)) -o requirements.lock

down:
	$(BIN)/lifecycle down

bench: setup
	$(BIN)/python -m benchmarks.lifecycle_wall
	$(BIN)/python -m benchmarks.report

clean:
	rm -rf .lifecycle
