# Every target bootstraps .venv on a fresh machine. PYTHONSAFEPATH keeps the repo root off sys.path,
# so the local datasets/ folder can never shadow HuggingFace's `datasets`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.shiftbench-installed
export PYTHONSAFEPATH := 1
export MPLBACKEND := Agg
export MLFLOW_ENABLE_ASYNC_LOGGING := false

.PHONY: install demo test test-fast bench bench-drift bench-sweep bench-pack clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23.1"
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[test,wilds,dvc,minilm,hf,ray,slurm]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/shiftbench demo --out runs/demo --reports reports

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench_scripts/train_speed.py

bench-drift: $(STAMP)
	$(BIN)/python bench_scripts/drift_speed.py

bench-sweep: $(STAMP)
	$(BIN)/python bench_scripts/sweep_speed.py

bench-pack: $(STAMP)
	$(BIN)/python bench_scripts/pack_speed.py

clean:
	rm -rf runs build *.egg-info
