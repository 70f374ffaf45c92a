# The two commands a new user needs: `make demo` and `make test`. Both install everything first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# nnU-Net's worker processes: keep them within a laptop / CI runner.
export nnUNet_n_proc_DA ?= 2

.PHONY: install demo test test-fast lint format bench clean

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

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

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
