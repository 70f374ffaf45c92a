# The two commands a new user needs: `make demo` and `make test`. Both install everything first.
SHELL  := /bin/bash
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
	@echo "Installing the pinned packages into $(VENV) (PyTorch, nnU-Net, Ray, ...: several minutes on a fresh machine)."
	@echo "torch==2.13.0 comes from pip's index: PyPI's Linux wheel is the CUDA build; for the CPU build set"
	@echo "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first (README, Development)."
	$(BIN)/python -m pip install --quiet --upgrade pip
	set -o pipefail; $(BIN)/python -m pip install -r requirements.txt -r requirements-dev.txt \
	  | { grep --line-buffered -E "^(Collecting|Installing collected|Successfully installed)" || true; } | cut -c1-160
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@$(BIN)/python -c "import torch, nnunetv2, ray" || { echo "The install is incomplete: see pip's messages above."; exit 1; }
	@touch $(STAMP)

# End to end on the project's own synthetic Decathlon task: synthesise (16 training, 20 test scans), prepare (convert +
# nnU-Net planning and preprocessing), train on CPU (about 2 minutes: enough to learn both labels), print the
# validation Dice, segment a test scan (label volumes in mm³) and write the train-vs-test drift report; then say where
# each output is.
DEMO_TRAIN := dataset=synthetic train=quick train.epochs=8 train.iterations_per_epoch=10 train.device=cpu
demo: install
	@test -f data/synthetic/Task500_Synthetic/dataset.json || $(BIN)/mlops synth synth.num_test=20
	$(BIN)/mlops prepare dataset=synthetic
	$(BIN)/mlops train --fold 0 $(DEMO_TRAIN)
	$(BIN)/mlops evaluate --fold 0 $(DEMO_TRAIN)
	$(BIN)/mlops predict data/synthetic/Task500_Synthetic/imagesTs/synth_016.nii.gz -o data/demo_seg.nii.gz dataset=synthetic
	$(BIN)/mlops drift dataset=synthetic
	@echo ""
	@echo "Demo done. Where everything is:"
	@echo "  data/synthetic/Task500_Synthetic/   the synthetic Decathlon task (labels 1 Anterior, 2 Posterior)"
	@echo "  data/nnUNet_results/Dataset500_Synthetic/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/"
	@echo "                                      the trained model, its log and nnU-Net's validation"
	@echo "  reports/validation_Dataset500_Synthetic_3d_fullres_fold0.json"
	@echo "                                      the Dice above: overlap with the reference labels, 1 is perfect, 0 none"
	@echo "  data/demo_seg.nii.gz                one test scan segmented (same geometry; the volumes above, in mm³)"
	@echo "  reports/drift_profile_vs_test.html  Evidently's drift report (open in a browser): the test scans against"
	@echo "                                      the model's reference profile of its training scans"
	@echo "Next: mlops serve --model data/nnUNet_results/Dataset500_Synthetic/nnUNetTrainer__nnUNetPlans__3d_fullres"
	@echo "      and open http://127.0.0.1:8000/ to segment a scan in the browser."

# System packages the tests drive: Debian's chromium (browser tests). Installed here when root with apt-get (CI,
# containers); elsewhere it says what is missing and those tests skip with the reason (under CI=true they fail).
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	PATH="$$PATH:/usr/sbin" command -v Orthanc >/dev/null 2>&1 || missing="$$missing orthanc"; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	command -v dciodvfy >/dev/null 2>&1 || missing="$$missing dicom3tools"; \
	command -v dcmdump >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "Installing Debian's$$missing for the browser and DICOM tests..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "Not installed:$$missing (apt-get install$$missing): their tests will skip"; fi

# The default tier (pytest.ini selects `not slow`): 12:24 on 2 cores, measured with the test models cached.
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
