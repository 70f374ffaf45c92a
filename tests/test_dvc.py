"""The DVC pipeline, run for real: the project's dvc.yaml and params.yaml in a temporary git repository.

The Decathlon archive is replaced by a synthetic stand-in of the same name, with configs/dataset/hippocampus.yaml's
sha256 set to the stand-in's and its url to a closed local port: the download stage must find the archive in place
and fetch nothing. Training uses nnU-Net's real trainer on a tiny schedule (params.yaml `train.schedule=quick`,
shortened). GCS (the real remote) cannot be reached here: a local folder stands in for it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from mlops.files import sha256 as sha256_file
from mlops.synth import SynthSpec, generate_task

from .conftest import REPO

BIN = Path(sys.executable).parent
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "init.defaultBranch=main"]
# What dvc.yaml's stages read from the repository: the pipeline, its parameters, the configs and the code they hash
# (every src/mlops path dvc.yaml names as a dependency).
CODE = sorted(set(re.findall(r"src/mlops/[\w/]+(?:\.py)?", (REPO / "dvc.yaml").read_text())))
PIPELINE_FILES = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore", "configs", *CODE]
MODEL = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def digest(root: Path) -> dict[str, str]:
    """Every file's hash, except what .dvcignore leaves out of outputs (nnU-Net's split file, written by training)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "splits_final.json"
    }


def run(repo: Path, *args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=repo, env=env, capture_output=True, text=True, check=False)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def dvc(repo: Path, *args: str, env: dict[str, str]) -> str:
    proc = run(repo, str(BIN / "dvc"), *args, env=env)
    return proc.stdout + proc.stderr


def base_env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "MLOPS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        MLOPS_CONFIG_DIR=str(repo / "configs"),
        WANDB_MODE="disabled",
        DVC_NO_ANALYTICS="1",
    )
    return env


def make_repo(repo: Path) -> None:
    """The project's pipeline files in a new git repository, committed (as a clone of the project has them)."""
    for name in PIPELINE_FILES:
        src, dst = REPO / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    (repo / ".dvc/.gitignore").write_text("/config.local\n/tmp\n/cache\n")
    subprocess.run([*GIT, "init", "-q"], cwd=repo, check=True)


def commit(repo: Path, message: str) -> None:
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=repo, check=True)


def set_yaml(path: Path, updates: dict) -> None:
    data = yaml.safe_load(path.read_text())
    for dotted, value in updates.items():
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_fresh_clone_dry_run_lists_every_stage(tmp_path: Path) -> None:
    """On a fresh clone nothing exists yet; a dry run must say what would run, in order, and create nothing."""
    origin = tmp_path / "origin"
    origin.mkdir()
    make_repo(origin)
    commit(origin, "pipeline")
    clone = tmp_path / "clone"
    subprocess.run([*GIT, "clone", "-q", str(origin), str(clone)], check=True, capture_output=True)
    env = base_env(clone)
    # Plain `--dry` stops at the first stage whose input does not exist yet (DVC 3 hashes it for its run cache,
    # treeverse/dvc#9818); --force-downstream marks everything after a stage that would run as running too.
    out = dvc(clone, "repro", "--dry", "--force-downstream", env=env)
    order = [out.index(f"Running stage '{s}'") for s in ("download", "prepare", "train@0", "train@4")]
    assert order == sorted(order)
    assert "Running stage 'drift'" in out
    assert "mlops train --fold 3 train=cpu" in out
    assert "paths.raw=data/nnUNet_raw" in out
    assert not (clone / "data").exists() and not (clone / "dvc.lock").exists()
    assert "YOUR_BUCKET" in (clone / ".dvc/config").read_text()  # an obvious placeholder, not a real bucket


@pytest.mark.slow
def test_pipeline_outputs_folds_and_remote(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    make_repo(repo)
    # The synthetic stand-in for the Decathlon archive, already downloaded.
    task = generate_task(tmp_path / "Task04_Hippocampus", SynthSpec(num_train=6, num_test=3, seed=5))
    archive = repo / "data/downloads/Task04_Hippocampus.tar"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w") as tar:
        tar.add(task, arcname=task.name)
    set_yaml(
        repo / "configs/dataset/hippocampus.yaml",
        {"sha256": sha256_file(archive), "url": "http://127.0.0.1:9/Task04_Hippocampus.tar"},
    )
    set_yaml(repo / "params.yaml", {"train.schedule": "quick", "train.folds": [0, 1]})
    set_yaml(
        repo / "configs/train/quick.yaml",
        {"epochs": 1, "iterations_per_epoch": 3, "val_iterations_per_epoch": 1, "device": "cpu", "num_workers": 0},
    )
    config = repo / "configs/config.yaml"
    config.write_text(config.read_text().replace("  mode: offline", "  mode: disabled"))  # W&B: no local run either
    commit(repo, "pipeline")
    remote = tmp_path / "remote"
    env = base_env(repo)
    dvc(repo, "remote", "add", "--local", "-d", "store", str(remote), env=env)

    # nnU-Net's and mlops' own variables point elsewhere: the pipeline's outputs must still land under data/.
    elsewhere = tmp_path / "elsewhere"
    env.update(
        nnUNet_raw=str(elsewhere / "raw"),
        nnUNet_preprocessed=str(elsewhere / "pre"),
        nnUNet_results=str(elsewhere / "results"),
        MLOPS_DATA_DIR=str(elsewhere / "data"),
    )
    archive_sha = sha256_file(archive)
    out = dvc(repo, "repro", "train@0", env=env)
    for stage in ("download", "prepare", "train@0"):
        assert f"Running stage '{stage}'" in out
    assert "train@1" not in out and "'drift'" not in out
    assert "already downloaded (SHA-256 verified)" in out  # the archive in place was kept, nothing fetched
    assert sha256_file(archive) == archive_sha
    raw = repo / "data/nnUNet_raw/Dataset004_Hippocampus"
    pre = repo / "data/nnUNet_preprocessed/Dataset004_Hippocampus"
    folds = [repo / f"data/nnUNet_results/Dataset004_Hippocampus/{MODEL}/fold_{f}" for f in (0, 1)]
    assert (pre / "nnUNetPlans.json").is_file() and (folds[0] / "checkpoint_final.pth").is_file()
    assert (repo / "reports/validation_Dataset004_Hippocampus_3d_fullres_fold0.json").is_file()
    assert not elsewhere.exists()

    # Fold 1's stage leaves fold 0 alone, and does not wipe its own folder before running (persist: true).
    fold0 = digest(folds[0])
    folds[1].mkdir(parents=True)
    (folds[1] / "kept.txt").write_text("a file beside the checkpoints, e.g. of an interrupted run")
    out = dvc(repo, "repro", env=env)
    assert "Running stage 'train@1'" in out and "Running stage 'drift'" in out
    assert "Running stage 'train@0'" not in out and "Running stage 'prepare'" not in out
    assert digest(folds[0]) == fold0
    assert (folds[1] / "kept.txt").is_file() and (folds[1] / "checkpoint_final.pth").is_file()
    assert not elsewhere.exists()
    html = repo / "reports/drift_train_vs_test.html"
    assert html.is_file()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {"download", "prepare", "train@0", "train@1", "drift"} <= set(lock)
    assert lock["train@1"]["outs"][0]["path"].endswith("fold_1")

    # Up to date: nothing reruns; a drift-only parameter reruns drift alone.
    assert "Running stage" not in dvc(repo, "repro", env=env)
    config.write_text(config.read_text().replace("max_drift_share: 0.0", "max_drift_share: 0.4"))
    out = dvc(repo, "repro", env=env)
    assert "Running stage 'drift'" in out and "Running stage 'prepare'" not in out
    assert "Running stage 'train@" not in out

    # Push everything, lose outputs and cache, pull them back byte for byte.
    dirs = [raw, pre, *folds]
    before = {d: digest(d) for d in dirs}
    before_html = hashlib.sha256(html.read_bytes()).hexdigest()
    dvc(repo, "push", env=env)
    for d in dirs:
        shutil.rmtree(d)
    html.unlink()
    shutil.rmtree(repo / ".dvc/cache")
    dvc(repo, "pull", env=env)
    assert {d: digest(d) for d in dirs} == before
    assert hashlib.sha256(html.read_bytes()).hexdigest() == before_html
    assert "Running stage" not in dvc(repo, "repro", env=env)
