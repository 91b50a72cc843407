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

## make system-packages: the Debian packages the suite drives, installed (as root, with apt-get)
## only for the commands that are missing, so a second run does nothing and prints nothing:
## chromium + chromium-driver for the dashboard's browser test (never a downloaded browser),
## slurmctld + slurmd + slurm-client + munge for the burst tests' private single-node Slurm,
## nodejs + npm for Luma's TypeScript client test, git for the wheel test, wrk for bench/intake.py
## (which falls back to a slower Python load generator without it). A failed install prints
## apt-get's error and what is still missing, and does not stop make: each test needing a missing
## package then skips naming it, and under CI=true fails naming it (tests/support/system_deps.py).
## Each entry is command:package.
SYSTEM_PACKAGES := chromium:chromium chromedriver:chromium-driver slurmctld:slurmctld slurmd:slurmd \
	sbatch:slurm-client munged:munge node:nodejs npm:npm git:git wrk:wrk
system-packages:
	@absent() { for pair in $(SYSTEM_PACKAGES); do \
	    command -v $${pair%%:*} >/dev/null 2>&1 || [ -x /usr/sbin/$${pair%%:*} ] || echo "$$pair"; done; }; \
	missing=$$(absent); \
	[ -z "$$missing" ] && exit 0; \
	commands=$$(for p in $$missing; do printf ' %s' "$${p%%:*}"; done); \
	packages=$$(for p in $$missing; do printf ' %s' "$${p#*:}"; done); \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "missing:$$commands (apt-get install$$packages needs root): the tests that need them skip, or fail under CI=true" >&2; \
	    exit 0; \
	fi; \
	echo "installing$$packages (missing:$$commands)"; \
	log=$$(mktemp); \
	{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 $$packages; } \
	    >"$$log" 2>&1 || { echo "apt-get install$$packages failed:" >&2; tail -n 30 "$$log" >&2; }; \
	rm -f "$$log"; \
	still=$$(absent | cut -d: -f1 | tr '\n' ' '); \
	[ -z "$$still" ] || echo "still missing: $$still(the tests that need them skip, or fail under CI=true)" >&2

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
