# Quickstart: `make up` runs the whole stack; `make test` runs the suite. Each creates .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip's own resolver refuses anything that does not satisfy these files; the stamp re-runs the
# install whenever a requirements file or setup.cfg changes.
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: up test venv dev-venv migrate check bench clean distclean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python requirements.txt setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(STAMP)

dev-venv: $(DEV_STAMP)

## make up: start Postgres, Redis, SeaweedFS, the API, workers, beat and Flower; Ctrl-C stops all.
up: $(STAMP)
	$(BIN)/dreamq up

## make test: the whole suite (unit, integration, end-to-end) on real services.
test: $(DEV_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make check: schema drift (alembic check) against a throwaway database.
check: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/integration/db $(PYTEST_ARGS)

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .dreamq
