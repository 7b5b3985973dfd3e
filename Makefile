# offbench: `make test` works as the first command on a fresh machine: it creates .venv and
# installs the project when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel; an open `torch` requirement would pull the newest CUDA build (several GB).
TORCH ?= torch==2.13.0
# `make benchmark GRID=table1 WORKERS=8`: the grid file configs/grids/$(GRID).yaml, cells run at once.
GRID ?= quick
WORKERS ?= 2
# `make perf`: updates timed per measurement. 300: 18 minutes on this 2-core CPU (SfBC's batch-4096
# update takes about a second on a CPU core); use PERF_UPDATES=1000 on a GPU.
PERF_UPDATES ?= 300

.PHONY: help install test test-all lint benchmark table perf clean-venv

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install offbench with its test tools

test: $(STAMP)  ## the default test run (under 10 minutes on 2 CPU cores)
	$(BIN)/pytest -q

test-all: $(STAMP)  ## every test, including the slow ones
	$(BIN)/pytest -q -m ""

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

benchmark: $(STAMP)  ## run configs/grids/$(GRID).yaml (GRID=quick|table1, WORKERS=N); re-run to resume
	$(BIN)/offbench bench configs/grids/$(GRID).yaml --workers $(WORKERS)

table: $(STAMP)  ## rewrite the tables and curves of results/$(GRID) (with LaTeX)
	$(BIN)/offbench table results/$(GRID) --latex

perf: $(STAMP)  ## training updates/s with and without Lightning and compiled, eval env-steps/s -> results/perf/
	$(BIN)/offbench perf --compile --updates $(PERF_UPDATES) --block-size $(PERF_UPDATES)

.PHONY: toy
toy: $(STAMP)  ## the DiffCPS toy bandit (20k updates per model, 11 models: ~2 h on one CPU core) -> results/toy/
	$(BIN)/offbench toy

clean-venv:  ## remove the virtualenv
	rm -rf $(VENV)
