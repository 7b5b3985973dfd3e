# offbench: `make test` works as the first command on a fresh machine: it creates .venv and
# installs the project when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU wheel; an open `torch` requirement would pull the newest CUDA build (several GB).
TORCH ?= torch==2.13.0
# `make benchmark GRID=table1 WORKERS=8`: the grid file configs/grids/$(GRID).yaml, cells run at once. It measures into
# BENCH_OUT, beside the committed results/$(GRID) (whose run records are shipped, so it would find every cell finished):
# same shipped data and protocol, your machine. BENCH_OUT=results/$(GRID) runs into the committed folder.
GRID ?= quick
WORKERS ?= 2
BENCH_OUT ?= runs/benchmark/$(GRID)
# `make perf`: every algorithm of the suite (configs/algorithms/, and the EXTRA_ROWS of offbench/perf.py) in one
# table, results/perf/perf.md and .json: 300 updates per timing window, fewer for the rows slow on a CPU (SLOW_ROWS
# of offbench/perf.py, each row's count in the table), compiled too; about 10 minutes on 2 idle CPU cores (docs/performance.md).
# PERF_ARGS adds flags, e.g. on a GPU: PERF_ARGS="--device cuda --updates 1000 --equal-updates".
PERF_ARGS ?=
# `make gpu-wheels` (on a machine with network) and `make gpu-check` (on a CUDA machine, with or without
# network; docs/gpu.md). The GPU machines this project borrows (x86-64, CPython 3.12, CUDA torch, Lightning,
# torchmetrics, h5py, pandas, rich, matplotlib, pytest) lack these; the versions are the ones .venv resolves.
# Left out: mujoco-studio and websockets (mujoco's viewer app: nothing here imports it, 13 MB).
GPU_WHEELS ?= gpu-wheels
GPU_PY ?= 3.12
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
GPU_PACKAGES := gymnasium==1.4.0 farama-notifications==0.0.6 mujoco==4.0.0 mujoco-core==4.0.0 glfw==2.11.0 \
	pyopengl==3.1.10 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 minari==0.5.4 \
	gymnasium-robotics==1.4.2 pettingzoo==1.27.0
GPU_SITE ?= /tmp/offbench-gpu-site
# The Python that has CUDA torch: .venv's when there is one (made with a CUDA torch wheel), else python3.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_ARGS ?=

.PHONY: help install test test-all lint benchmark table perf pgd gpu-wheels gpu-check clean-venv

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

benchmark: $(STAMP)  ## run configs/grids/$(GRID).yaml into runs/benchmark/$(GRID) (GRID=quick|table1, WORKERS=N); re-run to resume
	$(BIN)/offbench bench configs/grids/$(GRID).yaml --workers $(WORKERS) --out $(BENCH_OUT)

table: $(STAMP)  ## rewrite the tables and curves of results/$(GRID) (with LaTeX); without runs: exit 2, nothing written
	$(BIN)/offbench table results/$(GRID) --latex

perf: $(STAMP)  ## every algorithm's updates/s (Lightning, plain, compiled), eval env-steps/s, ~10 min on 2 cores -> results/perf/perf.md
	$(BIN)/offbench perf --compile $(PERF_ARGS)

gpu-wheels:  ## download the wheels a GPU machine without network lacks into gpu-wheels/ (CPython 3.12, x86-64)
	rm -rf $(GPU_WHEELS)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS) $(GPU_PACKAGES)
	@ls -s1 $(GPU_WHEELS); kib=$$(du -sk $(GPU_WHEELS) | cut -f1); echo "$(GPU_WHEELS): $$((kib / 1024)) MiB"; \
		test $$kib -le 65536 || { echo "error: $(GPU_WHEELS) is over 64 MiB"; exit 1; }

gpu-check:  ## on a CUDA machine: the cuda tests, perf and batched seeds on CUDA in under 10 min -> results/perf/perf-cuda.md
	@set -e; path="$(CURDIR)"; \
	if [ -d "$(GPU_WHEELS)" ]; then \
		echo "installing $(GPU_WHEELS)/*.whl into $(GPU_SITE) (no index, no deps: the machine's own torch)"; \
		$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; \
		path="$(GPU_SITE):$$path"; \
	fi; \
	PYTHONPATH="$$path$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) -m offbench.gpu_check $(GPU_CHECK_ARGS)

# `make pgd`: PGD's measurements on the shipped Pendulum data (docs/pgd.md). Each dataset's trajectory model is
# trained once (cached, resumable), then configs/grids/pgd.yaml, pgd-sweep.yaml (the guidance coefficients) and
# pgd-iql-causes.yaml with benchmarks/pgd_iql_rows.py (why IQL loses) run and write their tables (re-run to resume), then the reports.
PGD_DATASETS := shipped/pendulum-medium-replay-v0 shipped/pendulum-medium-v0
PGD_RUNS := results/pgd/learning/runs

.PHONY: pgd
pgd: $(STAMP)  ## PGD: trajectory models, the learning grid and the dynamics/likelihood reports -> results/pgd/
	for d in $(PGD_DATASETS); do $(BIN)/offbench data pgd train $$d --preset small --steps 20000 || exit 1; done
	$(BIN)/offbench bench configs/grids/pgd.yaml --workers $(WORKERS)
	$(BIN)/offbench bench configs/grids/pgd-sweep.yaml --workers $(WORKERS)
	$(BIN)/offbench data pgd train shipped/pendulum-medium-replay-v0 --preset small --steps 20000 --norm window --name small-window
	PYTHONPATH=. $(BIN)/offbench bench configs/grids/pgd-iql-causes.yaml --workers $(WORKERS)
	PYTHONPATH=. $(BIN)/python benchmarks/pgd_iql_rows.py shipped/pendulum-medium-replay-v0 --out results/pgd/iql-causes/rows.json \
		$(foreach c,iql iql-pgd iql-pgd-sim-both,--run results/pgd/iql-causes/runs/$(c)/shipped-pendulum-medium-replay-v0/seed0)
	for d in $(PGD_DATASETS); do slug=$$(echo $$d | tr / -); for algo in td3bc iql; do \
		$(BIN)/offbench data pgd report $$d --policy-run $(PGD_RUNS)/$$algo/$$slug/seed0 --trajectories 64 --length 32 \
			--sampling-steps 64 --edm-predictor --coeffs 0 0.1 1 10 --ensemble-steps 5000 \
			--out results/pgd/reports/$$algo || exit 1; done; done

.PHONY: toy
toy: $(STAMP)  ## the DiffCPS toy bandit, every config of configs/toy (20k updates per model; CPU hours: docs/toy.md) -> results/toy/
	$(BIN)/offbench toy

clean-venv:  ## remove the virtualenv
	rm -rf $(VENV)
