# Quick start on a fresh machine: `make run` (the demo) and `make test` (the whole suite).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
UV := $(PY) -m uv

.PHONY: run test lint typecheck pytest bench bench-deps install install-run clean

$(BIN)/python:
	@$(UV) --version >/dev/null 2>&1 || $(PY) -m pip install -q uv==0.13.8
	$(UV) venv -q --python $(PY) $(VENV)

install-run: $(BIN)/python
	$(UV) pip install -q --python $(BIN)/python -e '.[testing,server]'

install: $(BIN)/python
	$(UV) pip install -q --python $(BIN)/python -e '.[dev]'

run: install-run
	$(BIN)/tokenbroker dev $(ARGS)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy src

pytest: install
	$(BIN)/pytest --cov --cov-report=term -p no:cacheprovider $(PYTEST_ARGS)

test: lint typecheck pytest

bench-deps:
	command -v wrk || (apt-get update && apt-get install -y wrk)

bench: install bench-deps
	$(BIN)/python bench/hot_path.py
	$(BIN)/python bench/stampede.py
	$(BIN)/python bench/api.py

clean:
	rm -rf $(VENV) .coverage .mypy_cache .ruff_cache
