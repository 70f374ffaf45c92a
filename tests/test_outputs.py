"""No user file is ever lost: outputs never replace an input, never collide, never escape their folder (issue 24).

Each test reproduces an attack or slip found on the product, then asserts the refusal: exit 1 with one line naming
the paths, and nothing written (the inputs byte for byte as before, no output folder).
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import time
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mlops.batch.sources import list_cases
from mlops.cli import app
from mlops.errors import DatasetError

from .conftest import TrainedModel, Workspace, run_mlops


@pytest.fixture
def scan(synth_task: Path, tmp_path: Path) -> Path:
    src = tmp_path / "x.nii.gz"
    shutil.copy(synth_task / "imagesTs" / "synth_008.nii.gz", src)
    return src


def invoke(cli: CliRunner, trained: TrainedModel, *args: str) -> tuple[int, str]:
    result = cli.invoke(app, ["predict", *args, f"predict.model_dir={trained.model_dir}", "predict.tta=false"])
    return result.exit_code, " ".join(result.output.split())  # rich folds long lines


def test_predict_never_replaces_its_input(cli: CliRunner, trained_synth: TrainedModel, scan: Path) -> None:
    """Was: `mlops predict x.nii.gz -o x.nii.gz` replaced the scan with its segmentation, exit 0."""
    before = scan.read_bytes()
    for output in (scan, scan.parent / "." / scan.name, scan.parent / "link.nii.gz"):
        if output.name == "link.nii.gz":
            output.symlink_to(scan)
        code, out = invoke(cli, trained_synth, str(scan), "-o", str(output))
        assert code == 1 and "this is the input scan" in out, out
        assert scan.read_bytes() == before


def test_output_file_problems_are_one_line(cli: CliRunner, trained_synth: TrainedModel, scan: Path) -> None:
    """Was: raw Python tracebacks for -o to a folder, under a file, or without a NIfTI suffix."""
    folder = scan.parent / "existing"
    folder.mkdir()
    cases = {
        str(folder): "is a folder; give a file name",
        str(scan.parent / "x.nii.gz" / "y.nii.gz"): "is a file",
        str(scan.parent / "out.png"): "must end in .nii.gz",
    }
    for output, message in cases.items():
        code, out = invoke(cli, trained_synth, str(scan), "-o", output)
        assert code == 1 and message in out and "Traceback" not in out, (output, out)
    assert list(folder.iterdir()) == []


def test_colliding_names_in_a_folder_are_refused(cli: CliRunner, trained_synth: TrainedModel, scan: Path) -> None:
    """Was: case.nii, case.nii.gz and case_0000.nii.gz all wrote case.nii.gz; two were silently lost."""
    folder = scan.parent / "cohort"
    folder.mkdir()
    img = nib.load(scan)
    nib.save(img, folder / "case.nii")
    shutil.copy(scan, folder / "case.nii.gz")
    shutil.copy(scan, folder / "case_0000.nii.gz")
    shutil.copy(scan, folder / "other.nii.gz")
    code, out = invoke(cli, trained_synth, str(folder), "-o", str(scan.parent / "segs"))
    assert code == 1, out
    assert "1 output(s) would be written by more than one input" in out
    assert all(name in out for name in ("case.nii,", "case.nii.gz", "case_0000.nii.gz")), out
    assert not (scan.parent / "segs").exists()  # refused before any work


def test_output_folder_inside_the_input_is_refused(cli: CliRunner, trained_synth: TrainedModel, scan: Path) -> None:
    folder = scan.parent / "cohort"
    folder.mkdir()
    shutil.copy(scan, folder / "a.nii.gz")
    for output in (folder / ".", folder / "segs", scan.parent / "elsewhere" / ".." / "cohort"):
        code, out = invoke(cli, trained_synth, str(folder), "-o", str(output))
        assert code == 1 and "is, or is inside, the input folder" in out, (output, out)
    assert sorted(p.name for p in folder.iterdir()) == ["a.nii.gz"]


def test_batch_output_inside_the_input_is_refused(tmp_path: Path, scan: Path) -> None:
    """Was: `mlops batch SRC -o SRC/.` (or /x/../SRC) passed the string comparison and overwrote the inputs."""
    src = tmp_path / "cohort"
    src.mkdir()
    shutil.copy(scan, src / "a.nii.gz")
    for dest in (f"{src}/.", f"{tmp_path}/x/../cohort", f"{src}/segs", str(src)):
        with pytest.raises(DatasetError, match="is, or is inside, the input folder"):
            list_cases(str(src), dest)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(src / "a.nii.gz")]}).to_csv(manifest, index=False)
    with pytest.raises(DatasetError, match="would replace input scans"):
        list_cases(str(manifest), str(src))  # a.nii.gz -> src/a.nii.gz: the input itself
    proc = run_mlops("batch", str(src), "-o", f"{src}/.", "--model", str(tmp_path))  # fails before Ray starts
    assert proc.returncode == 1 and "is, or is inside, the input folder" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("case", ["../../escaped_case", "sub/dir/deep", "..", ".hidden", "a\\b", "x\ny"])
def test_manifest_case_ids_are_single_safe_names(tmp_path: Path, scan: Path, case: str) -> None:
    """Was: a case column of ../../escaped_case wrote outside DEST; sub/dir/deep nested folders."""
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(scan)], "case": [case]}).to_csv(manifest, index=False)
    with pytest.raises(DatasetError, match="is not a single file name"):
        list_cases(str(manifest), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_plain_nii_output_is_uncompressed_and_paths_with_equals_work(
    cli: CliRunner, trained_synth: TrainedModel, scan: Path, tmp_path: Path
) -> None:
    """Was: -o out.nii got gzip bytes (nibabel could not open it); a=b.nii.gz was taken as a Hydra override."""
    folder = tmp_path / "run=1"
    folder.mkdir()
    odd = folder / "a=b.nii.gz"
    shutil.copy(scan, odd)
    plain, packed = tmp_path / "out.nii", tmp_path / "out.nii.gz"
    for output in (plain, packed):
        code, out = invoke(cli, trained_synth, str(odd), "-o", str(output))
        assert code == 0, out
    assert plain.read_bytes()[:2] != b"\x1f\x8b" and packed.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(packed.read_bytes())[:4] == plain.read_bytes()[:4]
    a, b = nib.load(plain), nib.load(packed)
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    np.testing.assert_array_equal(a.affine, nib.load(scan).affine)
    code, out = invoke(cli, trained_synth, str(folder))
    assert code == 0, out
    assert (tmp_path / "run=1_seg" / "a=b.nii.gz").is_file()


class _Hanging(fsspec.AbstractFileSystem):
    """An object store that never answers (what gcsfs does for a bucket it cannot reach: retries for minutes)."""

    protocol = "hang"

    def _hang(self, *args: object, **kwargs: object) -> None:
        time.sleep(60)

    isdir = exists = ls = info = _open = _hang  # type: ignore[assignment]


def test_unreachable_source_and_missing_files_fail_in_seconds(tmp_path: Path) -> None:
    """Was: `mlops batch gs://missing-bucket/...` without network failed after 102 s with three tracebacks, and a
    manifest of 2000 missing files took 96 s. Listing is bounded (batch.list_timeout_s); local files are checked there.
    GCS cannot be reached from here: a filesystem that never answers stands in for it."""
    fsspec.register_implementation("hang", _Hanging, clobber=True)
    t0 = time.monotonic()
    with pytest.raises(DatasetError, match=r"no answer within 1 s while listing it"):
        list_cases("hang://missing-bucket/cohort", str(tmp_path / "out"), timeout_s=1)
    assert time.monotonic() - t0 < 5
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": [str(tmp_path / f"gone_{i}.nii.gz") for i in range(2000)]}).to_csv(manifest, index=False)
    t0 = time.monotonic()
    with pytest.raises(DatasetError, match=r"none of its 2000 row\(s\) names a readable file"):
        list_cases(str(manifest), str(tmp_path / "out"))
    assert time.monotonic() - t0 < 5


def test_serve_fetches_its_model_before_starting_and_fails_in_seconds(cli: CliRunner, workspace: Workspace) -> None:
    """Was: `serve.model_uri` on a store that cannot be reached: an aiohttp traceback from uvicorn's start-up, exit 3.
    Now the model is fetched before the server starts, bounded by serve.model_fetch_timeout_s: one line, exit 1."""
    fsspec.register_implementation("hang", _Hanging, clobber=True)
    t0 = time.monotonic()
    result = cli.invoke(app, ["serve", "serve.model_uri=hang://missing-bucket/model", "serve.model_fetch_timeout_s=1"])
    assert result.exit_code == 1 and "no answer within 1 s" in result.output, result.output
    assert "Traceback" not in result.output and time.monotonic() - t0 < 10
    result = cli.invoke(app, ["serve", "serve.model_uri=memory://empty/model"])
    assert result.exit_code == 1 and "no nnU-Net model folder there" in result.output, result.output


def test_unwritable_or_failing_outputs_are_one_line(
    cli: CliRunner, trained_synth: TrainedModel, scan: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was: an unwritable -o, or a disk that fills up while writing, ended in a traceback. Tests run as root here,
    where every folder is writable: the permission check and the failing write are simulated."""
    import mlops.outputs
    import mlops.predict

    out = scan.parent / "locked" / "seg.nii.gz"
    monkeypatch.setattr(mlops.outputs.os, "access", lambda path, mode: False)
    code, text = invoke(cli, trained_synth, str(scan), "-o", str(out))
    assert code == 1 and "permission denied" in text and "Traceback" not in text, text
    monkeypatch.undo()

    def full(img: object, path: Path) -> None:
        Path(path).write_bytes(b"half")  # what a full disk leaves: part of the file
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(mlops.predict.nib, "save", full)
    code, text = invoke(cli, trained_synth, str(scan), "-o", str(out))
    monkeypatch.undo()
    assert code == 1 and "No space left on device" in text and "Traceback" not in text, text
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_urls_and_paths_with_equals_signs_are_inputs_not_overrides() -> None:
    """Was: `gs://bucket/run=1/` (a partitioned cohort) was taken as a Hydra override: batch said 'missing SOURCE'."""
    from mlops.cli.common import split_args

    for arg in ("gs://bucket/run=1/", "data/run=2/a.nii.gz", "memory://x/y=z"):
        assert split_args([arg, "train.epochs=5"]) == ([arg], ["train.epochs=5"]), arg
    assert split_args(["predict.tta=false"]) == ([], ["predict.tta=false"])


def test_reports_and_stamps_are_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """files.write_atomic (summaries, reports, profiles, stamps, the parity record): a write that fails at the last
    step leaves the previous file as it was and no temporary file behind."""
    from mlops.files import sha256, write_atomic

    target = tmp_path / "reports" / "drift_train_vs_test_summary.json"
    write_atomic(target, '{"verdict": "no drift"}')
    assert target.read_text() == '{"verdict": "no drift"}'
    assert sha256(target) == hashlib.sha256(b'{"verdict": "no drift"}').hexdigest()

    def fail(self: Path, other: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, b'{"verdict": "drift"}')
    monkeypatch.undo()
    assert target.read_text() == '{"verdict": "no drift"}'
    assert [p.name for p in target.parent.iterdir()] == [target.name]
