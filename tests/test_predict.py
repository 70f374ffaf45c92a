"""`mlops predict`: files and folders, exact geometry for any orientation, label volumes, clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mlops.volumes import InputError, check_volume, decode_nifti

from .conftest import SHARED, TrainedModel, run_mlops

ODD = SHARED / "odd_volumes"
ODD_SCANS = [
    "sct_testing_data/t2/t2.nii.gz",  # PSR orientation
    "sct_testing_data/mt/mt1.nii.gz",  # LAS, 0.84 x 0.84 x 17 mm, int16
    "sct_testing_data/t2s/t2s.nii.gz",  # LAS, 0.5 x 0.5 x 7.5 mm
    "ivadomed_data_testing/ct_scan/sub-spleen2/ct/sub-spleen2_ct.nii.gz",  # CT in HU, qform code 0 (sform only)
]


def assert_same_geometry(out: Path, src: Path) -> None:
    a, b = nib.load(out), nib.load(src)
    assert a.shape == b.shape[:3]
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(a.get_qform(), b.get_qform())
    np.testing.assert_array_equal(a.get_sform(), b.get_sform())
    assert (int(a.header["qform_code"]), int(a.header["sform_code"])) == (
        int(b.header["qform_code"]),
        int(b.header["sform_code"]),
    )
    assert a.header.get_zooms()[:3] == b.header.get_zooms()[:3]
    assert nib.aff2axcodes(a.affine) == nib.aff2axcodes(b.affine)
    assert a.get_data_dtype() == np.uint8


def predict_args(trained: TrainedModel, *extra: str) -> list[str]:
    return ["predict", *extra, f"predict.model_dir={trained.model_dir}", "predict.tta=false"]


def test_predict_file_prints_volumes(trained_synth: TrainedModel, synth_task: Path, tmp_path: Path) -> None:
    src = synth_task / "imagesTs" / "synth_008.nii.gz"
    out = tmp_path / "seg.nii.gz"
    proc = run_mlops(
        *predict_args(trained_synth, str(src), "-o", str(out), "--json"), env=trained_synth.workspace.env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    assert_same_geometry(out, src)
    seg = np.asanyarray(nib.load(out).dataobj)
    voxel = float(np.prod(nib.load(src).header.get_zooms()[:3]))
    # volumes are reported to 0.001 mm³
    assert row["volumes_mm3"]["Anterior"] == pytest.approx((seg == 1).sum() * voxel, abs=1e-3)
    assert row["volumes_mm3"]["Posterior"] == pytest.approx((seg == 2).sum() * voxel, abs=1e-3)
    ref = np.asanyarray(nib.load(synth_task.with_name(synth_task.name + "_labelsTs") / src.name).dataobj)
    overlap = 2 * ((seg == 1) & (ref == 1)).sum() / ((seg == 1).sum() + (ref == 1).sum())
    assert overlap > 0.5  # the trained model segments the anterior structure


def test_predict_folder_matches_per_file(trained_synth: TrainedModel, synth_task: Path, tmp_path: Path) -> None:
    proc = run_mlops(
        *predict_args(trained_synth, str(synth_task / "imagesTs"), "-o", str(tmp_path / "out")),
        env=trained_synth.workspace.env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["synth_008.nii.gz", "synth_009.nii.gz"]
    assert "Anterior" in proc.stdout and "synth_009" in proc.stdout
    for name in ("synth_008.nii.gz", "synth_009.nii.gz"):
        assert_same_geometry(tmp_path / "out" / name, synth_task / "imagesTs" / name)
    # The folder path overlaps loading, the network and writing in three threads: same labels as one file alone.
    single = tmp_path / "single.nii.gz"
    case = synth_task / "imagesTs" / "synth_009.nii.gz"
    proc = run_mlops(*predict_args(trained_synth, str(case), "-o", str(single)), env=trained_synth.workspace.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(single).dataobj), np.asanyarray(nib.load(tmp_path / "out" / case.name).dataobj)
    )


@pytest.mark.real_data
@pytest.mark.slow  # a real-scan sweep: the slow tier
def test_geometry_preserved_on_odd_scans(trained_synth: TrainedModel, tmp_path: Path) -> None:
    """Non-RAS, anisotropic, int16 and sform-only scans: the hippocampus-like model is wrong for them, but the
    segmentation must land exactly on the input's voxel grid, and nothing may crash."""
    if not ODD.is_dir():
        pytest.skip(f"real data absent: {ODD}")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for rel in ODD_SCANS:
        (inputs / Path(rel).name).symlink_to(ODD / rel)
    proc = run_mlops(
        *predict_args(trained_synth, str(inputs), "-o", str(tmp_path / "out")), env=trained_synth.workspace.env()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in ODD_SCANS:
        assert_same_geometry(tmp_path / "out" / Path(rel).name, ODD / rel)


def test_no_trained_model(workspace, synth_task: Path) -> None:
    proc = run_mlops(
        "predict", str(synth_task / "imagesTs" / "synth_008.nii.gz"), "dataset.id=500", env=workspace.env()
    )
    assert proc.returncode == 1
    assert "no trained model in" in proc.stderr and "nnUNetTrainer__nnUNetPlans__3d_fullres" in proc.stderr
    assert "mlops train --fold 0" in proc.stderr


def test_missing_fold(trained_synth: TrainedModel, synth_task: Path) -> None:
    proc = run_mlops(
        *predict_args(trained_synth, str(synth_task / "imagesTs" / "synth_008.nii.gz"), "--folds", "0,4"),
        env=trained_synth.workspace.env(),
    )
    assert proc.returncode == 1
    assert "fold(s) [4]" in proc.stderr


def test_bad_file_in_folder_is_reported_others_done(
    trained_synth: TrainedModel, synth_task: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = synth_task / "imagesTs" / "synth_008.nii.gz"
    (inputs / good.name).write_bytes(good.read_bytes())
    (inputs / "broken.nii.gz").write_bytes(good.read_bytes()[:500])
    proc = run_mlops(
        *predict_args(trained_synth, str(inputs), "-o", str(tmp_path / "out")), env=trained_synth.workspace.env()
    )
    assert proc.returncode == 1
    assert "broken.nii.gz" in proc.stderr and "1 of 2 file(s)" in proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["synth_008.nii.gz"]  # no half-written file


# ----------------------------------------------------------------------------- input decoding, no model needed
def _nifti_bytes(data: np.ndarray, affine: np.ndarray | None = None) -> bytes:
    return nib.Nifti1Image(data, np.eye(4) if affine is None else affine).to_bytes()


def test_decode_roundtrip_gz_and_plain() -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    for raw in (_nifti_bytes(data), gzip.compress(_nifti_bytes(data))):
        img = decode_nifti(raw, "x.nii.gz")
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b"", 400, "empty file"),
        (b"this is not a nifti file at all" * 20, 400, "not a NIfTI"),
        (gzip.compress(b"garbage" * 100), 400, "not a NIfTI"),
        (b"\x1f\x8b\x08\x00garbage", 400, "corrupt or truncated gzip"),
    ],
    ids=["empty", "text", "gzip-of-garbage", "corrupt-gzip"],
)
def test_decode_rejects_non_nifti(raw: bytes, status: int, message: str) -> None:
    with pytest.raises(InputError, match=message) as exc:
        decode_nifti(raw, "x.nii.gz")
    assert exc.value.status == status


def test_decode_rejects_truncated() -> None:
    raw = gzip.compress(_nifti_bytes(np.random.default_rng(0).random((20, 20, 20), dtype=np.float32)))
    with pytest.raises(InputError) as exc:
        decode_nifti(raw[: len(raw) // 2], "x.nii.gz")
    assert exc.value.status == 400


def test_voxel_limit_checked_from_header_before_inflating() -> None:
    """A header declaring 1000^3 voxels and no data behind it: refused for size, not for truncation."""
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 1000))
    header.set_data_dtype(np.float32)
    raw = gzip.compress(header.binaryblock + b"\x00" * 4)
    with pytest.raises(InputError, match="above the limit") as exc:
        decode_nifti(raw, "bomb.nii.gz", max_voxels=10_000_000)
    assert exc.value.status == 413


@pytest.mark.parametrize(
    ("shape", "channels", "message"),
    [((10, 10), 1, "2D image"), ((10, 10, 10, 3), 1, "single-channel 3D"), ((10, 10, 10), 2, "2 channels")],
)
def test_check_volume_dimensionality(shape: tuple[int, ...], channels: int, message: str) -> None:
    img = nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4))
    with pytest.raises(InputError, match=message) as exc:
        check_volume(img, "x.nii.gz", channels)
    assert exc.value.status == 422


def test_check_volume_nan_and_singleton() -> None:
    data = np.zeros((8, 8, 8, 1), np.float32)
    assert check_volume(nib.Nifti1Image(data, np.eye(4)), "x").shape == (8, 8, 8)  # (x, y, z, 1) is 3D
    data[1, 1, 1, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        check_volume(nib.Nifti1Image(data, np.eye(4)), "x")
