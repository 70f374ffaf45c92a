"""The DVC pipeline, run for real: the project's dvc.yaml in a temporary repository with a local-folder remote.

The download stage needs the internet, so the Decathlon archive is replaced by a synthetic stand-in of the same name;
prepare and drift then run exactly as declared. GCS (the real remote) cannot be reached here: a folder stands in.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mlops.synth import SynthSpec, generate_task

from .conftest import REPO

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def dvc(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "MLOPS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", MLOPS_CONFIG_DIR=str(repo / "configs"), WANDB_MODE="disabled"
    )
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_repro_push_pull_roundtrip(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(REPO / "configs", repo / "configs")
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    for src in ("decathlon.py", "prepare.py", "drift.py"):  # stage dependencies
        (repo / "src/mlops").mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "src/mlops" / src, repo / "src/mlops" / src)
    task = generate_task(tmp_path / "Task04_Hippocampus", SynthSpec(num_train=6, num_test=3, seed=5))
    (repo / "data/downloads").mkdir(parents=True)
    with tarfile.open(repo / "data/downloads/Task04_Hippocampus.tar", "w") as tar:
        tar.add(task, arcname=task.name)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "-d", "store", str(remote))

    out = dvc(repo, "repro", "--single-item", "prepare")
    assert "Running stage 'prepare'" in out
    dvc(repo, "repro", "--single-item", "drift")
    raw = repo / "data/nnUNet_raw/Dataset004_Hippocampus"
    pre = repo / "data/nnUNet_preprocessed/Dataset004_Hippocampus"
    html = repo / "reports/drift_train_vs_test.html"
    assert (pre / "nnUNetPlans.json").is_file() and html.is_file()
    assert (repo / "dvc.lock").is_file()

    # A parameter read only by the drift stage reruns drift, not prepare.
    config = repo / "configs/config.yaml"
    config.write_text(config.read_text().replace("max_drift_share: 0.5", "max_drift_share: 0.4"))
    assert "didn't change, skipping" in dvc(repo, "repro", "--single-item", "prepare")
    assert "Running stage 'drift'" in dvc(repo, "repro", "--single-item", "drift")

    before = {d: digest(d) for d in (raw, pre)}
    before_html = hashlib.sha256(html.read_bytes()).hexdigest()
    dvc(repo, "push", "prepare", "drift")
    shutil.rmtree(raw)
    shutil.rmtree(pre)
    html.unlink()
    shutil.rmtree(repo / ".dvc/cache")
    dvc(repo, "pull", "prepare", "drift")
    assert {d: digest(d) for d in (raw, pre)} == before  # every file back, byte for byte
    assert hashlib.sha256(html.read_bytes()).hexdigest() == before_html
