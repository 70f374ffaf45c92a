"""`mlops prepare` with nnU-Net's real fingerprinting, planning and preprocessing on a tiny synthetic task."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mlops.cli import app

from .conftest import Workspace, run_mlops


def test_prepare_runs_nnunet_planning_and_preprocessing(prepared_synth: Workspace) -> None:
    pre = prepared_synth.preprocessed / "Dataset500_Synthetic"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert "3d_fullres" in plans["configurations"]
    assert plans["dataset_name"] == "Dataset500_Synthetic"
    fullres = pre / plans["configurations"]["3d_fullres"]["data_identifier"]
    cases = sorted(p.stem for p in fullres.glob("*.pkl"))
    assert cases == [f"synth_{i:03d}" for i in range(8)]
    assert len(list(fullres.glob("*_seg.b2nd"))) == 8  # blosc2 arrays for image and segmentation
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text())
    assert len(fingerprint["shapes_after_crop"]) == 8
    assert len(list((pre / "gt_segmentations").glob("*.nii.gz"))) == 8
    saved = yaml.safe_load((pre / "mlops_prepare_config.yaml").read_text())
    assert saved["prepare"]["configurations"] == ["3d_fullres"]
    assert saved["paths"]["raw"] == str(prepared_synth.raw)


def test_second_run_is_up_to_date(private_synth: Workspace, synth_task: Path) -> None:
    """A second `mlops prepare` of the same task (here on a copy of the cached preparation: it rewrites its saved
    configuration) does no nnU-Net work and changes nothing nnU-Net reads."""
    plans = private_synth.preprocessed / "Dataset500_Synthetic" / "nnUNetPlans.json"
    mtime = plans.stat().st_mtime_ns
    t0 = time.perf_counter()
    proc = run_mlops("prepare", str(synth_task), env=private_synth.env())
    assert proc.returncode == 0, proc.stderr
    assert "is up to date" in proc.stdout
    assert time.perf_counter() - t0 < 30  # generous: no nnU-Net work, only process start-up
    assert plans.stat().st_mtime_ns == mtime


def test_changed_source_is_reconverted(
    cli: CliRunner, task_copy: Path, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlops import prepare as prepare_mod

    calls: list[bool] = []

    def fake_preprocess(cfg, identity, pre_root, digest, n, reconverted):  # nnU-Net itself is covered above
        calls.append(reconverted)
        return Path("plans.json"), ["3d_fullres"]

    monkeypatch.setattr(prepare_mod, "preprocess", fake_preprocess)
    assert cli.invoke(app, ["prepare", str(task_copy), "-j", "1"]).exit_code == 0
    result = cli.invoke(app, ["prepare", str(task_copy), "-j", "1"])
    assert "is up to date with" in result.output
    img = task_copy / "imagesTr" / "synth_000.nii.gz"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    result = cli.invoke(app, ["prepare", str(task_copy), "-j", "1"])
    assert result.exit_code == 0 and "Wrote" in result.output
    assert cli.invoke(app, ["prepare", str(task_copy), "-j", "1", "--force"]).exit_code == 0
    assert calls == [True, False, True, True]


def test_override_sets_dataset_id(
    cli: CliRunner, task_copy: Path, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlops import prepare as prepare_mod

    monkeypatch.setattr(prepare_mod, "preprocess", lambda *a, **k: (Path("plans.json"), []))
    result = cli.invoke(app, ["prepare", str(task_copy), "dataset.id=621", "dataset.name=Hippo", "-j", "1"])
    assert result.exit_code == 0, result.output
    assert (workspace.raw / "Dataset621_Hippo" / "dataset.json").is_file()


def test_nnunet_env_vars_win_over_config(
    cli: CliRunner, task_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlops import prepare as prepare_mod

    monkeypatch.setattr(prepare_mod, "preprocess", lambda *a, **k: (Path("plans.json"), []))
    monkeypatch.setenv("MLOPS_DATA_DIR", str(tmp_path / "unused"))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / "mine" / var))
    assert cli.invoke(app, ["prepare", str(task_copy), "-j", "1"]).exit_code == 0
    assert (tmp_path / "mine" / "nnUNet_raw" / "Dataset500_Synthetic" / "dataset.json").is_file()
    assert not (tmp_path / "unused").exists()


def test_dataset_id_clash_is_refused(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    (workspace.raw / "Dataset500_Other").mkdir(parents=True)
    result = cli.invoke(app, ["prepare", str(task_copy)])
    assert result.exit_code == 1
    assert "dataset id 500 is already used by Dataset500_Other" in result.output


def test_source_without_task_name_needs_id(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    plain = task_copy.parent / "my_scans"
    shutil.move(task_copy, plain)
    result = cli.invoke(app, ["prepare", str(plain)])
    assert result.exit_code == 2
    assert "set dataset.id=NNN dataset.name=Name" in result.output
