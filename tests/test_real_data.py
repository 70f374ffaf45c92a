"""Real Decathlon Task04 scans from ../shared/data (skipped cleanly when absent)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mlops.cli import app

from .conftest import TrainedModel, Workspace, run_mlops

pytestmark = pytest.mark.real_data


@pytest.mark.slow  # a real-scan sweep: the slow tier
def test_prepare_real_hippocampus(hippocampus: Path, workspace: Workspace) -> None:
    proc = run_mlops("prepare", str(hippocampus), env=workspace.env())
    assert proc.returncode == 0, proc.stderr
    raw = workspace.raw / "Dataset004_Hippocampus"
    ds = json.loads((raw / "dataset.json").read_text())
    assert ds["numTraining"] == 170
    assert ds["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert ds["channel_names"] == {"0": "MRI"}
    assert len(list((raw / "imagesTr").glob("*_0000.nii.gz"))) == 170
    assert len(list((raw / "labelsTr").glob("*.nii.gz"))) == 170
    assert len(list((raw / "imagesTs").glob("*_0000.nii.gz"))) == 30

    src_meta = json.loads((hippocampus / "dataset.json").read_text())
    pairs = [(e["image"], e["label"]) for e in src_meta["training"]] + [(e, None) for e in src_meta["test"]]
    for image_rel, label_rel in pairs:
        case = Path(image_rel).name.removesuffix(".nii.gz")
        split = "Tr" if label_rel else "Ts"
        src, dst = nib.load(hippocampus / image_rel), nib.load(raw / f"images{split}" / f"{case}_0000.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(dst.dataobj), np.asanyarray(src.dataobj), err_msg=case)
        np.testing.assert_array_equal(dst.affine, src.affine, err_msg=case)
        if label_rel:
            lsrc, ldst = nib.load(hippocampus / label_rel), nib.load(raw / "labelsTr" / f"{case}.nii.gz")
            ldata = np.asanyarray(ldst.dataobj)
            np.testing.assert_array_equal(ldata, np.asanyarray(lsrc.dataobj), err_msg=case)
            assert set(np.unique(ldata).tolist()) <= {0, 1, 2}

    pre = workspace.preprocessed / "Dataset004_Hippocampus"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert "3d_fullres" in plans["configurations"]
    assert len(list((pre / plans["configurations"]["3d_fullres"]["data_identifier"]).glob("*.pkl"))) == 170

    again = run_mlops("prepare", str(hippocampus), env=workspace.env())
    assert again.returncode == 0 and "is up to date" in again.stdout


def test_prepare_real_hippocampus_from_tar(
    hippocampus: Path, tmp_path: Path, workspace: Workspace, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The .tar path, on an archive of the real folder (nnU-Net preprocessing is covered by the test above)."""
    from mlops import prepare as prepare_mod

    monkeypatch.setattr(prepare_mod, "preprocess", lambda *a, **k: (Path("plans.json"), []))
    tar_path = tmp_path / "Task04_Hippocampus.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(hippocampus, arcname="Task04_Hippocampus")
    result = cli.invoke(app, ["prepare", str(tar_path)])
    assert result.exit_code == 0, result.output
    raw = workspace.raw / "Dataset004_Hippocampus"
    assert len(list((raw / "imagesTr").iterdir())) == 170 and len(list((raw / "imagesTs").iterdir())) == 30
    for src in sorted((hippocampus / "labelsTr").glob("*.nii.gz"))[:20]:
        assert (raw / "labelsTr" / src.name).read_bytes() == src.read_bytes()


@pytest.mark.slow
def test_brief_training_on_real_cases_beats_chance(hippocampus: Path, trained_real: TrainedModel) -> None:
    """A few minutes of CPU training on the real scans, scored by nnU-Net's validation of fold 0 (34 real cases)."""
    fold = trained_real.fold_dir
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 34
    # Chance: labelling voxels at random with each label's prevalence scores a Dice equal to that prevalence.
    labels = [np.asanyarray(nib.load(p).dataobj) for p in sorted((hippocampus / "labelsTr").glob("*.nii.gz"))]
    prevalence = max(float(np.mean([(lbl == k).mean() for lbl in labels])) for k in (1, 2))
    best = max(summary["mean"][k]["Dice"] for k in ("1", "2"))
    assert best > 5 * prevalence, (summary["mean"], prevalence)
