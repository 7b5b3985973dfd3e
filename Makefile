# offbench: `make test` works as the first command on a fresh machine: it creates .venv and
# installs the project when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel; an open `torch` requirement would pull the newest CUDA build (several GB).
TORCH ?= torch==2.13.0

.PHONY: help install test test-all lint clean-venv

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

clean-venv:  ## remove the virtualenv
	rm -rf $(VENV)
