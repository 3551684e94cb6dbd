# Quick start on a fresh machine: `make run` (the demo) and `make test` (the whole suite).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A non-editable install whose proxy modules are compiled by mypyc (hatch_build.py).
COMPILED := .venv-compiled
# uv lives in the project's own venv: nothing is installed outside this folder.
UV := $(BIN)/uv

.PHONY: run test lint typecheck pytest compiled pytest-compiled bench bench-deps test-deps install install-run clean

$(BIN)/uv:
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip >/dev/null
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==0.13.8

install-run: $(BIN)/uv
	$(UV) pip install -q --python $(BIN)/python -e '.[testing,server]'

install: $(BIN)/uv
	$(UV) pip install -q --python $(BIN)/python -e '.[dev]'

run: install-run
	$(BIN)/tokenbroker dev $(ARGS)

lint: install
	$(BIN)/ruff check src tests bench hatch_build.py
	$(BIN)/ruff format --check src tests bench hatch_build.py

typecheck: install
	$(BIN)/mypy src

# Debian's PostgreSQL server binaries and redis-server: the tests run their own servers from
# them on free ports (tests/pg.py, tests/redis_server.py; services the packages start are not
# used); Debian's chromium, which the status page's browser tests drive through Playwright
# (never `playwright install`). As root, with no standard input.
test-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		missing="$$missing postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y$$missing </dev/null; \
	fi

# TOKENBROKER_REQUIRE_BROWSER: under `make test` a missing chromium fails the browser tests
# instead of skipping them.
pytest: install test-deps
	TOKENBROKER_REQUIRE_BROWSER=1 $(BIN)/pytest --cov --cov-report=term -p no:cacheprovider $(PYTEST_ARGS)

# The proxy's tests again, on the compiled build (the speed of bench/proxy.py's figures).
compiled: $(BIN)/uv
	$(UV) venv -q --allow-existing --python $(PY) $(COMPILED)
	HATCH_BUILD_HOOK_ENABLE_CUSTOM=1 $(UV) pip install -q --python $(COMPILED)/bin/python \
		--reinstall-package tokenbroker '.[dev]'

pytest-compiled: compiled
	TOKENBROKER_EXPECT_COMPILED=1 $(COMPILED)/bin/pytest -p no:cacheprovider \
		tests/test_proxy_http.py tests/test_proxy_pool.py tests/test_proxy_server.py \
		tests/test_proxy_streaming.py tests/test_statuses.py

test: lint typecheck pytest pytest-compiled

# Debian's wrk (the load generator) and nginx (upstream and the reference proxy of
# bench/proxy.py, which runs its own instances; a service the package starts is not used).
bench-deps:
	@missing=""; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y$$missing; \
	fi

bench: install bench-deps test-deps
	$(BIN)/python bench/hot_path.py
	$(BIN)/python bench/stampede.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/tracing.py
	$(MAKE) compiled
	$(COMPILED)/bin/python bench/proxy.py

clean:
	rm -rf $(VENV) $(COMPILED) build .coverage .mypy_cache .ruff_cache
