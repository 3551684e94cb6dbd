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

# Debian's wrk (the load generator) and nginx (upstream and the reference proxy of
# bench/proxy.py, which runs its own instances; a service the package starts is not used).
bench-deps:
	@missing=""; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y$$missing; \
	fi

bench: install bench-deps
	$(BIN)/python bench/hot_path.py
	$(BIN)/python bench/stampede.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/proxy.py

clean:
	rm -rf $(VENV) .coverage .mypy_cache .ruff_cache
