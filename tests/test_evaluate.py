"""Dice scoring: exact values on known arrays, folder matching, nnU-Net's NaN convention, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mlops.cli import app
from mlops.errors import DatasetError
from mlops.evaluate import dice, score_folders


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.uint8), np.eye(4)), path)


def test_dice_exact() -> None:
    ref = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[:2] = 1  # 32 voxels
    pred[1:3] = 1  # 32 voxels, 16 shared
    assert dice(pred, ref, 1) == pytest.approx(2 * 16 / 64)
    assert dice(ref, ref, 1) == 1.0
    assert math.isnan(dice(pred, ref, 2))  # absent from both: undefined, as in nnU-Net


def test_score_folders(tmp_path: Path) -> None:
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[:3] = 1
    ref[3:] = 2
    other = ref.copy()
    other[:3] = 0  # label 1 missed entirely, label 2 perfect
    _save(ref, tmp_path / "ref" / "a.nii.gz")
    _save(ref, tmp_path / "pred" / "a.nii.gz")
    _save(ref, tmp_path / "ref" / "b.nii.gz")
    _save(other, tmp_path / "pred" / "b.nii.gz")
    report = score_folders(tmp_path / "pred", tmp_path / "ref", {0: "background", 1: "Anterior", 2: "Posterior"})
    assert report.num_cases == 2
    assert report.mean == {"Anterior": 0.5, "Posterior": 1.0}
    assert report.foreground_mean == 0.75
    assert report.per_case[1] == {"case": "b", "dice": {"Anterior": 0.0, "Posterior": 1.0}}
    json.loads(report.to_json())  # valid JSON, no NaN


def test_missing_prediction_and_shape_mismatch(tmp_path: Path) -> None:
    _save(np.ones((4, 4, 4)), tmp_path / "ref" / "a.nii.gz")
    _save(np.ones((4, 4, 4)), tmp_path / "ref" / "b.nii.gz")
    _save(np.ones((4, 4, 3)), tmp_path / "pred" / "a.nii.gz")
    with pytest.raises(DatasetError, match="no prediction for 1 reference case"):
        score_folders(tmp_path / "pred", tmp_path / "ref")
    _save(np.ones((4, 4, 4)), tmp_path / "pred" / "b.nii.gz")
    with pytest.raises(DatasetError, match=r"shape \(4, 4, 3\) differs"):
        score_folders(tmp_path / "pred", tmp_path / "ref")


def test_evaluate_cli_on_folders(synth_task: Path, tmp_path: Path, cli: CliRunner) -> None:
    labels_ts = synth_task.with_name(synth_task.name + "_labelsTs")
    result = cli.invoke(
        app, ["evaluate", "--pred", str(labels_ts), "--ref", str(labels_ts), f"paths.reports={tmp_path}", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / f"evaluate_{labels_ts.name}_vs_{labels_ts.name}.json").read_text())
    assert report["foreground_mean"] == 1.0 and report["num_cases"] == 2
