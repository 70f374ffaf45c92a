"""Decathlon -> nnU-Net raw conversion: exact data and geometry, 4D splitting, tar input, and every bad input."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from mlops.cli import app
from mlops.decathlon import convert_task, read_task

from .conftest import Workspace


def assert_same_volume(converted: Path, source: np.ndarray, source_img: nib.Nifti1Image) -> None:
    img = nib.load(converted)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), source)
    np.testing.assert_array_equal(img.affine, source_img.affine)
    assert int(img.header["qform_code"]) == int(source_img.header["qform_code"])
    assert int(img.header["sform_code"]) == int(source_img.header["sform_code"])


def test_convert_3d_task_exact(synth_task: Path, tmp_path: Path) -> None:
    task = read_task(synth_task)
    summary = convert_task(task, tmp_path / "out", num_workers=1)
    out = tmp_path / "out"
    assert (summary.num_training, summary.num_test) == (8, 2)
    assert summary.files_copied == 8 * 2 + 2 and summary.files_encoded == 0  # 3D .nii.gz: copied, not re-encoded

    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "MRI"}
    assert ds["labels"] == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert ds["numTraining"] == 8 and ds["file_ending"] == ".nii.gz"

    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"synth_{i:03d}_0000.nii.gz" for i in range(8)]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"synth_{i:03d}.nii.gz" for i in range(8)]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["synth_008_0000.nii.gz", "synth_009_0000.nii.gz"]
    for i in range(8):
        src = nib.load(synth_task / "imagesTr" / f"synth_{i:03d}.nii.gz")
        assert_same_volume(out / "imagesTr" / f"synth_{i:03d}_0000.nii.gz", np.asanyarray(src.dataobj), src)
        lbl = nib.load(synth_task / "labelsTr" / f"synth_{i:03d}.nii.gz")
        assert_same_volume(out / "labelsTr" / f"synth_{i:03d}.nii.gz", np.asanyarray(lbl.dataobj), lbl)


def test_convert_4d_two_channel_task_splits_channels(synth_task_4d: Path, tmp_path: Path) -> None:
    task = read_task(synth_task_4d)
    assert task.num_channels == 2
    summary = convert_task(task, tmp_path / "out", num_workers=2)
    out = tmp_path / "out"
    assert summary.files_encoded == 5 * 2  # every 4D image becomes two 3D files
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "MRI", "1": "MRI_T2"}
    for case in ["synth_000", "synth_003"]:
        src = nib.load(synth_task_4d / "imagesTr" / f"{case}.nii.gz")
        data = np.asanyarray(src.dataobj)
        assert data.ndim == 4 and data.shape[3] == 2
        for c in range(2):
            converted = out / "imagesTr" / f"{case}_{c:04d}.nii.gz"
            assert_same_volume(converted, data[..., c], src)
            assert nib.load(converted).header.get_zooms() == src.header.get_zooms()[:3]
    test_src = nib.load(synth_task_4d / "imagesTs" / "synth_004.nii.gz")
    assert_same_volume(out / "imagesTs" / "synth_004_0001.nii.gz", np.asanyarray(test_src.dataobj)[..., 1], test_src)


def test_macos_resource_forks_are_ignored(task_copy: Path, tmp_path: Path) -> None:
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (task_copy / folder / "._synth_000.nii.gz").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    task = read_task(task_copy)
    assert task.problems == []
    convert_task(task, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("._*"))


# ------------------------------------------------------------------------------------------------ bad input
def _edit_label(task: Path, case: str, edit) -> None:
    path = task / "labelsTr" / f"{case}.nii.gz"
    img = nib.load(path)
    data, affine = edit(np.asanyarray(img.dataobj).copy()), img.affine
    nib.save(nib.Nifti1Image(data, affine), path)


def _prepare_fails(cli: CliRunner, task: Path, ws: Workspace, *expected: str) -> str:
    result = cli.invoke(app, ["prepare", str(task), "-j", "1"])
    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.output, result.output
    assert "Traceback" not in result.output
    leftovers = list(ws.raw.iterdir()) if ws.raw.exists() else []
    assert leftovers == [], f"partial output left behind: {leftovers}"
    assert not ws.preprocessed.exists() or not list(ws.preprocessed.iterdir())
    return result.output


def test_truncated_image(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    path = task_copy / "imagesTr" / "synth_003.nii.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _prepare_fails(cli, task_copy, workspace, "case synth_003", "unreadable or truncated")


def test_label_shape_mismatch(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    _edit_label(task_copy, "synth_001", lambda d: d[:-2])
    _prepare_fails(cli, task_copy, workspace, "case synth_001", "does not match image shape")


def test_label_value_not_declared(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    def put7(d: np.ndarray) -> np.ndarray:
        d[0, 0, 0] = 7
        return d

    _edit_label(task_copy, "synth_005", put7)
    _prepare_fails(cli, task_copy, workspace, "case synth_005", "label values [7] are not declared")


def test_missing_label(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    (task_copy / "labelsTr" / "synth_002.nii.gz").unlink()
    _prepare_fails(cli, task_copy, workspace, "case synth_002", "missing on disk: label labelsTr/synth_002.nii.gz")


def test_2d_image(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    path = task_copy / "imagesTr" / "synth_004.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, 0], img.affine), path)
    _prepare_fails(cli, task_copy, workspace, "case synth_004", "is 2D", "expected a 3D volume")


def test_case_listed_but_absent(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    meta_path = task_copy / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["training"].append({"image": "./imagesTr/synth_099.nii.gz", "label": "./labelsTr/synth_099.nii.gz"})
    meta_path.write_text(json.dumps(meta))
    _prepare_fails(cli, task_copy, workspace, "case synth_099", "listed in dataset.json but missing on disk")


def test_file_on_disk_but_not_listed(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    meta_path = task_copy / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["training"] = meta["training"][1:]
    meta_path.write_text(json.dumps(meta))
    _prepare_fails(cli, task_copy, workspace, "case synth_000", "not listed in dataset.json")


def test_every_problem_reported_at_once(cli: CliRunner, task_copy: Path, workspace: Workspace) -> None:
    (task_copy / "labelsTr" / "synth_002.nii.gz").unlink()
    _edit_label(task_copy, "synth_006", lambda d: d[:, :-1])
    out = _prepare_fails(cli, task_copy, workspace, "case synth_002", "case synth_006", "2 problem(s)")
    assert out.index("synth_002") < out.index("synth_006")  # reported in case order


def test_failed_run_keeps_previous_dataset(
    cli: CliRunner, task_copy: Path, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad re-run (forced) must leave the last good conversion untouched."""
    from mlops import prepare as prepare_mod

    monkeypatch.setattr(prepare_mod, "preprocess", lambda *a, **k: (Path("plans.json"), []))
    assert cli.invoke(app, ["prepare", str(task_copy), "-j", "1"]).exit_code == 0
    good = workspace.raw / "Dataset500_Synthetic"
    before = sorted(p.name for p in good.rglob("*"))
    (task_copy / "labelsTr" / "synth_002.nii.gz").unlink()
    result = cli.invoke(app, ["prepare", str(task_copy), "-j", "1", "--force"])
    assert result.exit_code == 1
    assert sorted(p.name for p in good.rglob("*")) == before
    assert [p.name for p in workspace.raw.iterdir()] == ["Dataset500_Synthetic"]


def test_tar_source_with_resource_forks(
    task_copy: Path, tmp_path: Path, cli: CliRunner, workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlops import prepare as prepare_mod

    monkeypatch.setattr(prepare_mod, "preprocess", lambda *a, **k: (Path("plans.json"), []))
    (task_copy / "._dataset.json").write_bytes(b"AppleDouble")
    tar_path = tmp_path / "Task500_Synthetic.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(task_copy, arcname=task_copy.name)
    result = cli.invoke(app, ["prepare", str(tar_path), "-j", "1"])
    assert result.exit_code == 0, result.output
    out = workspace.raw / "Dataset500_Synthetic"
    assert len(list((out / "imagesTr").iterdir())) == 8
    assert [p.name for p in workspace.raw.iterdir()] == ["Dataset500_Synthetic"]  # extraction folder cleaned up


def test_truncated_tar(tmp_path: Path, cli: CliRunner, workspace: Workspace, task_copy: Path) -> None:
    tar_path = tmp_path / "Task500_Synthetic.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(task_copy, arcname=task_copy.name)
    tar_path.write_bytes(tar_path.read_bytes()[:30000])
    result = cli.invoke(app, ["prepare", str(tar_path)])
    assert result.exit_code == 1
    assert "Task500_Synthetic.tar" in result.output
    assert not workspace.raw.exists() or not list(workspace.raw.iterdir())
