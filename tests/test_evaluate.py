"""Dice scoring: exact values on known arrays, folder matching, nnU-Net's NaN convention, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from loguru import logger
from typer.testing import CliRunner

from mlops.cli import app
from mlops.errors import DatasetError
from mlops.evaluate import dice, label_metrics, score_folders

from .conftest import TrainedModel


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
    row = report.per_case[1]
    assert (row["case"], row["dice"]) == ("b", {"Anterior": 0.0, "Posterior": 1.0})
    assert row["metrics"]["Anterior"]["recall"] == 0.0 and row["metrics"]["Anterior"]["precision"] is None
    json.loads(report.to_json())  # valid JSON, no NaN


def test_partial_set_is_scored_with_a_warning_and_shape_mismatch_fails(tmp_path: Path) -> None:
    _save(np.ones((4, 4, 4)), tmp_path / "ref" / "a.nii.gz")
    _save(np.ones((4, 4, 4)), tmp_path / "ref" / "b.nii.gz")
    _save(np.ones((4, 4, 4)), tmp_path / "ref" / "c.nii.gz")
    _save(np.ones((4, 4, 4)), tmp_path / "pred" / "a.nii.gz")
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        report = score_folders(tmp_path / "pred", tmp_path / "ref")
    finally:
        logger.remove(sink)
    assert report.num_cases == 1 and report.missing == ["b", "c"] and report.mean == {"label_1": 1.0}
    assert any("no prediction for 2 of 3 reference case(s), left out: b, c" in m for m in messages), messages
    _save(np.ones((4, 4, 4)), tmp_path / "other" / "z.nii.gz")
    with pytest.raises(DatasetError, match="no prediction for any of the 3 reference"):
        score_folders(tmp_path / "other", tmp_path / "ref")
    _save(np.ones((4, 4, 3)), tmp_path / "pred" / "b.nii.gz")
    with pytest.raises(DatasetError, match=r"shape \(4, 4, 3\) differs"):
        score_folders(tmp_path / "pred", tmp_path / "ref")


def test_label_metrics_by_hand() -> None:
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[:2] = 1  # 32 voxels
    pred = np.zeros_like(ref)
    pred[1:4] = 1  # 48 voxels, 16 shared: tp 16, fp 32, fn 16
    m = label_metrics(pred, ref, 1, (2.0, 1.0, 1.0), hd95=True)
    assert m["dice"] == pytest.approx(2 * 16 / (2 * 16 + 32 + 16))  # 0.4
    assert m["iou"] == pytest.approx(16 / 64)
    assert m["precision"] == pytest.approx(16 / 48)
    assert m["recall"] == pytest.approx(16 / 32)
    assert m["volume_error_mm3"] == pytest.approx((48 - 32) * 2.0)  # voxels of 2 mm³
    assert m["relative_volume_error"] == pytest.approx(0.5)
    # the slabs' surfaces: ref x=0,1 / pred x=1..3 (x spacing 2 mm); every surface voxel of one is within 0 or
    # 2 mm (one x step) of the other's surface except pred's far face x=3, 4 mm from ref's x=1 face
    assert m["hd95_mm"] == pytest.approx(4.0)
    a, b = np.zeros((6, 3, 3), np.uint8), np.zeros((6, 3, 3), np.uint8)
    a[0, 1, 1], b[3, 1, 1] = 1, 1  # single voxels 3 steps apart along a 2 mm axis
    assert label_metrics(b, a, 1, (2.0, 1.0, 1.0), hd95=True)["hd95_mm"] == pytest.approx(6.0)
    assert label_metrics(a, a, 1, (1.0, 1.0, 1.0), hd95=True)["hd95_mm"] == 0.0
    empty = label_metrics(np.zeros_like(ref), ref, 2, (1.0, 1.0, 1.0), hd95=True)  # label 2 in neither
    assert all(math.isnan(empty[k]) for k in ("dice", "iou", "precision", "recall", "hd95_mm"))
    assert empty["volume_error_mm3"] == 0.0
    missed = label_metrics(np.zeros_like(ref), ref, 1, (1.0, 1.0, 1.0))
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and math.isnan(missed["precision"])
    assert missed["relative_volume_error"] == -1.0 and "hd95_mm" not in missed


def test_folder_report_has_every_metric(tmp_path: Path) -> None:
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[:2] = 1
    pred = np.zeros_like(ref)
    pred[1:3] = 1  # tp 16, fp 16, fn 16
    _save(ref, tmp_path / "ref" / "a.nii.gz")
    _save(pred, tmp_path / "pred" / "a.nii.gz")
    report = score_folders(tmp_path / "pred", tmp_path / "ref", {0: "bg", 1: "Anterior"}, hd95=True)
    means = report.metrics_mean["Anterior"]
    assert means["dice"] == 0.5 and means["iou"] == pytest.approx(1 / 3, abs=1e-6)
    assert means["precision"] == means["recall"] == 0.5 and means["volume_error_mm3"] == 0.0
    assert means["hd95_mm"] == pytest.approx(1.0)  # the shifted slab's faces are one 1 mm step apart
    assert report.per_case[0]["metrics"]["Anterior"]["iou"] == pytest.approx(1 / 3, abs=1e-6)
    json.loads(report.to_json())


def test_evaluate_cli_on_folders(synth_task: Path, tmp_path: Path, cli: CliRunner) -> None:
    labels_ts = synth_task.with_name(synth_task.name + "_labelsTs")
    result = cli.invoke(
        app, ["evaluate", "--pred", str(labels_ts), "--ref", str(labels_ts), f"paths.reports={tmp_path}", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / f"evaluate_{labels_ts.name}_vs_{labels_ts.name}.json").read_text())
    assert report["foreground_mean"] == 1.0 and report["num_cases"] == 2


def test_folders_are_scored_under_the_dataset_label_names(
    synth_task: Path, trained_synth: TrainedModel, tmp_path: Path, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: `evaluate --pred --ref` without a prepared dataset named the columns label_1, label_2. Now the trained
    model's names (the one predict uses), else a dataset.json beside the folders (the Decathlon's format too)."""
    monkeypatch.setenv("MLOPS_DATA_DIR", str(tmp_path / "empty"))  # nothing prepared here
    labels_ts = synth_task.with_name(synth_task.name + "_labelsTs")
    args = ["evaluate", "--pred", str(labels_ts), "--ref", str(labels_ts), "--json"]
    result = cli.invoke(app, [*args, f"paths.reports={tmp_path}", f"predict.model_dir={trained_synth.model_dir}"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / f"evaluate_{labels_ts.name}_vs_{labels_ts.name}.json").read_text())
    assert set(report["mean"]) == {"Anterior", "Posterior"}
    ref = tmp_path / "task" / "labelsTs"
    shutil.copytree(labels_ts, ref)
    shutil.copy(synth_task / "dataset.json", ref.parent)  # the Decathlon's dataset.json beside the labels
    result = cli.invoke(app, ["evaluate", "--pred", str(labels_ts), "--ref", str(ref), f"paths.reports={tmp_path}"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / f"evaluate_{labels_ts.name}_vs_labelsTs.json").read_text())
    assert set(report["mean"]) == {"Anterior", "Posterior"}
