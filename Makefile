# dlrhub: every target does its own set-up on a fresh machine.
#   make run   - run the service on its embedded default (SQLite under ./data/)
#   make test  - buf lint, buf breaking, generated-code check, ruff, mypy and the test suite
#   make gen   - regenerate gen/ from protos/
#   make bench - the benchmarks (see bench/README.md)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
INSTALLED := $(VENV)/.installed
NODE_INSTALLED := node_modules/.installed

.PHONY: setup run test lint gen bench clean

setup: $(INSTALLED) $(NODE_INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

$(NODE_INSTALLED): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: $(INSTALLED)
	$(BIN)/dlrhub serve

lint: setup
	node_modules/.bin/buf lint
	$(PY) tools/buf_breaking.py
	$(PY) tools/generate_protos.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

gen: $(INSTALLED)
	$(PY) tools/generate_protos.py

# BENCH_ARGS: e.g. --quick, --full, --event-loop both, --profile (python -m bench --help).
BENCH_ARGS ?=

bench: $(INSTALLED) $(NODE_INSTALLED)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
