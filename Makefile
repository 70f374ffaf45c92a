# The two commands a new user needs: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# nnU-Net's worker processes: keep them within a laptop / CI runner.
export nnUNet_n_proc_DA ?= 2

.PHONY: install system-deps demo test test-slow test-all test-models coverage lint format bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# End to end on the project's own synthetic Decathlon task: synthesise, prepare (convert + nnU-Net planning and
# preprocessing), train briefly on CPU (about a minute), print the validation Dice, segment a test case (label
# volumes in mm³) and write the train-vs-test drift report.
demo: install
	@test -f data/synthetic/Task500_Synthetic/dataset.json || $(BIN)/mlops synth
	$(BIN)/mlops prepare dataset=synthetic
	$(BIN)/mlops train --fold 0 dataset=synthetic train=quick train.device=cpu
	$(BIN)/mlops evaluate --fold 0 dataset=synthetic train=quick
	$(BIN)/mlops predict data/synthetic/Task500_Synthetic/imagesTs/synth_016.nii.gz -o data/demo_seg.nii.gz dataset=synthetic
	$(BIN)/mlops drift dataset=synthetic

# System packages the tests drive: Debian's chromium (browser tests). Installed here when root with apt-get (CI,
# containers); elsewhere it says what is missing and those tests skip with the reason (under CI=true they fail).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing Debian's chromium for the browser tests..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed (apt-get install chromium): browser tests will skip"; fi; }

# The default tier: under 15 minutes on 2 cores (pytest.ini selects `not slow`).
test: install system-deps
	$(BIN)/python -m pytest

# The slow tier: the real trained Task04 model (built once per machine into ~/.cache/mlops-tests, about 50 minutes
# on 2 cores, then reused), full pipelines and real-scan sweeps.
test-slow: install system-deps
	$(BIN)/python -m pytest -m slow --timeout=3600

test-all: install system-deps
	$(BIN)/python -m pytest -m "" --timeout=3600

# Build the cached test models ahead of a run (the fixtures build them on first use otherwise).
test-models: install
	$(BIN)/python -m tests.models synthetic
	$(BIN)/python -m tests.models real

# Both tiers with line coverage of src/ (subprocesses too: coverage's patch = subprocess, pyproject.toml).
coverage: install system-deps
	COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/python -m pytest -m "" --timeout=3600 --cov=mlops --cov-report=term

# Every tracked file through the local hooks of .pre-commit-config.yaml: ruff, YAML/JSON/TOML parsing, hygiene,
# actionlint (+ shellcheck) on the workflows, check-jsonschema on the workflows and cloudbuild.yaml, hadolint on the
# Dockerfiles, shellcheck on shell scripts, DVC's own validation of dvc.yaml. All from pinned packages in .venv.
lint: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure --color=never

format: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_drift.py
	$(BIN)/python benchmarks/bench_predict.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf data/synthetic data/nnUNet_raw data/nnUNet_preprocessed data/nnUNet_results .pytest_cache .ruff_cache
