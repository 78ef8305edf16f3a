# dlrhub: every target does its own set-up on a fresh machine.
#   make run      - run the service on its embedded default (SQLite under ./data/); ARGS='...' adds flags
#   make test     - buf lint, buf breaking, generated-code check, ruff, mypy and the test suite
#   make client-tools - for the README's second terminal: grpcurl in .venv/bin, the Node client's packages
#   make gen      - regenerate gen/ from protos/
#   make bench    - the benchmarks (see bench/README.md)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# Two distributions from this checkout: dlrhub-client (./client) and the server, dlrhub (.).
# Running needs them and their dependencies only; the checks need the dev extra too.
RUNTIME_INSTALLED := $(VENV)/.runtime-installed
INSTALLED := $(VENV)/.installed
NODE_INSTALLED := node_modules/.installed
# Flags for `dlrhub serve`, e.g. make run ARGS='--listen 0.0.0.0:50051'.
ARGS ?=

.PHONY: setup run client-tools test lint gen bench clean

setup: $(INSTALLED) $(NODE_INSTALLED)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# Each first uninstalls dlrhub: before the split it owned the `dlrhub` script (now dlrhub-client's),
# and reinstalling it over that version would remove the script after dlrhub-client installed it.
$(RUNTIME_INSTALLED): pyproject.toml client/pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip uninstall -qq --yes dlrhub
	$(PIP) -e ./client -e .
	touch $@

$(INSTALLED): pyproject.toml client/pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip uninstall -qq --yes dlrhub
	$(PIP) -e ./client -e '.[dev]'
	touch $@ $(RUNTIME_INSTALLED)

$(NODE_INSTALLED): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: $(RUNTIME_INSTALLED)
	$(BIN)/dlrhub serve $(ARGS)

client-tools: $(RUNTIME_INSTALLED) $(NODE_INSTALLED)
	$(PIP) -e ./client -e '.[grpcurl]'

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
	$(PIP) -e ./client -e '.[dev,bench]'
	$(PY) -m bench $(BENCH_ARGS)

# *.egg-info: setuptools' metadata of the editable installs (at the top: before the split, stale).
clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache *.egg-info server/*.egg-info client/*.egg-info
