# Two commands set everything up on a fresh machine: `make study` and `make test`.
# Each creates .venv on first use (torch==2.14.1 torchvision==0.29.1 + bnlib with its extras).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bnlib-installed
PRESET ?= quick
WORKERS ?= 2
# test processes (pytest-xdist): the suite spends most of its time waiting on kernels and
# subprocesses, so 2 processes halve its wall time on 2 cores; TEST_WORKERS=0 runs it in one
TEST_WORKERS ?= 2
# DATASET=synthetic runs every study on bnlib's generated set (no files needed), e.g. where
# Fashion-MNIST can be neither found nor downloaded.
DATASET ?=
export PYTHONUNBUFFERED := 1

.PHONY: venv study test lab bench gpu-check params readme ladders clean-outputs

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q --disable-pip-version-check -e '.[lab,test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import torch, torchvision, bnlib, papermill, seaborn; print('bnlib', bnlib.__version__, 'torch', torch.__version__)"
	@touch $@

# The main job: every study at the quick preset, the summary, and the HTML report.
study: $(STAMP)
	$(PY) -m bnlib study all --preset $(PRESET) --workers $(WORKERS) $(if $(DATASET),--dataset $(DATASET))

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

# JupyterLab on notebooks/, with this environment's Python as the kernel.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

bench: $(STAMP)
	$(PY) scripts/bench.py

# on a machine with a CUDA GPU: pytest -m cuda, bench's GPU rows, a P1 quick grid with
# --runs-per-gpu and a resume after SIGKILL, each step under a timeout (475 s in all); outputs/gpu_check/summary.txt.
# Without a GPU it says so and runs nothing.
gpu-check: $(STAMP)
	PY=$(PY) scripts/gpu_check.sh

# notebooks/run.ipynb's parameters cell, regenerated from bnlib.RunConfig (after adding a parameter)
params: $(STAMP)
	$(PY) scripts/sync_params.py

# README.md's verdict table, regenerated from outputs/studies/*/verdicts.json (after make study),
# and its calibration table, from bnlib.calibration (about a minute)
readme: $(STAMP)
	$(PY) scripts/readme_verdicts.py
	$(PY) scripts/readme_calibration.py

# the quick presets' learning-rate ladders (bnlib/studies/ladders/*.json), regenerated from
# validation-only sweeps with seeds disjoint from the studies' (docs/presets.md); LADDERS=p1 for one
LADDERS ?= p1 p5 p3
ladders: $(STAMP)
	$(PY) scripts/ladders.py $(LADDERS) --workers $(WORKERS)

clean-outputs:
	find outputs -mindepth 1 ! -name README.md -exec rm -rf {} +
