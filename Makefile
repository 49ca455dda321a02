# The two commands: `make run` (whole pipeline on the built-in data) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.arsr-installed
TORCH  ?= torch==2.13.0
export PATH := $(abspath $(VENV))/bin:$(PATH)
export WANDB_MODE ?= offline

.PHONY: setup run test lint bench clean

$(PY):
	python3 -m venv $(VENV)

# Re-installs only when pyproject.toml changes (fast when already installed).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	dvc repro

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf data runs eval reports .snakemake
