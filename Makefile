# Quickstart: `make up` runs the whole stack; `make test` runs the suite. Each creates .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip's own resolver refuses anything that does not satisfy these files; the stamp re-runs the
# install whenever a requirements file or setup.cfg changes.
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: up test lint venv dev-venv system-packages browser migrate check bench clean distclean

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

## make system-packages: Debian packages some end-to-end tests drive, installed only when missing
## and only as root with apt-get; never fails (without them those tests skip, naming what is
## missing): chromium + chromium-driver for the dashboard's browser test (never a downloaded
## browser), slurmctld + slurmd + munge for the single-node Slurm of the burst tests, wrk for
## bench/intake.py (which falls back to a slower Python load generator without it).
SYSTEM_PACKAGES := chromium chromium-driver slurmctld slurmd slurm-client munge wrk
system-packages:
	@missing=""; \
	for bin in chromium chromedriver slurmctld slurmd sbatch munged wrk; do \
	    command -v $$bin >/dev/null 2>&1 || [ -x /usr/sbin/$$bin ] || missing="$$missing $$bin"; \
	done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	        echo "installing $(SYSTEM_PACKAGES) (missing:$$missing)"; \
	        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); } \
	            >/dev/null 2>&1 || echo "system package install failed: browser/Slurm tests will skip, bench/intake.py uses its Python load generator" >&2; \
	    else \
	        echo "missing:$$missing (needs root and apt-get): browser/Slurm tests will skip, bench/intake.py uses its Python load generator" >&2; \
	    fi; \
	fi

browser: system-packages

## make test: the whole suite (unit, integration, end-to-end) on real services.
test: $(DEV_STAMP) system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make lint: ruff (lint + format check), mypy on app/tasks/workers, and the import-layer contracts
## (import-linter, [importlinter] in setup.cfg: layers import downwards only; docs/architecture.md).
lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app tasks workers
	$(BIN)/lint-imports

## make check: schema drift (alembic check) against a throwaway database.
check: $(DEV_STAMP)
	$(BIN)/python -m pytest tests/integration/db $(PYTEST_ARGS)

## make bench: every benchmark (baseline and ours interleaved in the same run), about 11 minutes;
## writes bench/results.md (the table the README links) and bench/results.json.
bench: $(DEV_STAMP) system-packages
	$(BIN)/python -m bench.run_all

clean:
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .dreamq
