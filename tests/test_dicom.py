"""DICOM in, DICOM-SEG out, and a round trip with a real PACS (Debian's Orthanc with its DICOMweb plugin).

Series are made from real scans (Task04, the odd volumes) and the synthetic task by `mlops.dicom.convert`; the
reference reader is SimpleITK's (GDCM) series reader, not ours. Every SEG written is checked by dciodvfy (dicom3tools)
and read back by dcmdump (DCMTK) and highdicom; its labels must equal the NIfTI path's on the same scan exactly.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from loguru import logger

from mlops.cli import app
from mlops.dicom import web
from mlops.dicom.convert import series_from_nifti, write_series
from mlops.dicom.seg import read_labels
from mlops.dicom.series import read_folder, read_zip
from mlops.volumes import InputError

from .conftest import SHARED, Orthanc, TrainedModel, serve_in_process, system_tool

CASE = "synth_008.nii.gz"
REAL_CASE = "hippocampus_007.nii.gz"
ODD = SHARED / "odd_volumes"
ODD_SCANS = [
    "ivadomed_data_testing/ct_scan/sub-spleen2/ct/sub-spleen2_ct.nii.gz",  # CT in HU, 0.8 x 0.8 x 5 mm
    "sct_testing_data/t2/t2.nii.gz",  # PSR orientation
    "sct_testing_data/mt/mt1.nii.gz",  # LAS, 0.84 x 0.84 x 17 mm
]


def make_series(src: Path, folder: Path, **kwargs: object) -> list[pydicom.Dataset]:
    datasets = series_from_nifti(nib.load(src), **kwargs)  # type: ignore[arg-type]
    write_series(datasets, folder)
    return datasets


def zipped(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"export/{f.name}")
    return buffer.getvalue()


def simpleitk_nifti(folder: Path, out: Path) -> Path:
    """The series as NIfTI by SimpleITK's series reader (GDCM): the reference for geometry and values."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    sitk.WriteImage(reader.Execute(), str(out))
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    exe = system_tool("dciodvfy", "dicom3tools")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def dcmdump(path: Path) -> str:
    exe = system_tool("dcmdump", "dcmtk")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def assert_seg_matches(seg_file: Path, series_dir: Path, expected: np.ndarray, expected_affine: np.ndarray) -> None:
    """A SEG passes dciodvfy, DCMTK and highdicom read it, and its frames mapped to slices equal ``expected``."""
    assert dciodvfy_errors(seg_file) == []
    dump = dcmdump(seg_file)
    assert "SegmentationStorage" in dump and "Anterior" in dump and "Posterior" in dump
    seg = hd.seg.segread(seg_file)
    assert [d.segment_label for d in seg.SegmentSequence] == ["Anterior", "Posterior"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Hippocampus"  # dataset config
    series = read_folder(series_dir)
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == series.series_uid
    assert str(seg.FrameOfReferenceUID) == str(series.datasets[0].FrameOfReferenceUID)
    assert seg.SeriesDate and seg.SeriesNumber == 900  # a PACS lists it in the study beside its source series
    labels = read_labels(seg, series)
    np.testing.assert_allclose(series.image.affine, expected_affine, atol=1e-4)
    assert np.array_equal(labels, expected), f"{int((labels != expected).sum())} voxels differ"


def test_series_geometry_and_values_match_simpleitk(synth_task: Path, tmp_path: Path) -> None:
    """Our reader gives SimpleITK's grid and values, and the original scan's world geometry (any orientation)."""
    scans = [synth_task / "imagesTs" / CASE, *(ODD / s for s in ODD_SCANS if (ODD / s).is_file())]
    for i, src in enumerate(scans):
        folder = tmp_path / f"s{i}"
        make_series(src, folder, modality="CT" if "_ct" in src.name else "MR")
        ours = read_folder(folder).image
        ref = nib.load(simpleitk_nifti(folder, tmp_path / f"s{i}.nii.gz"))
        assert ours.shape == ref.shape, src
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4, err_msg=str(src))
        np.testing.assert_array_equal(ours.get_fdata(dtype=np.float32), ref.get_fdata().astype(np.float32))
        original = nib.as_closest_canonical(nib.load(src))
        mine = nib.as_closest_canonical(ours)
        np.testing.assert_allclose(mine.affine, original.affine, atol=1e-3, err_msg=str(src))
        step = np.ptp(original.get_fdata()) / 65000  # 16-bit storage: half a step of quantisation
        assert np.abs(mine.get_fdata() - original.get_fdata()).max() <= step + 1e-6, src


def test_bad_series_are_clear_errors(synth_task: Path, tmp_path: Path) -> None:
    src = synth_task / "imagesTs" / CASE
    base = tmp_path / "base"
    datasets = make_series(src, base)
    n = len(datasets)

    def variant(
        name: str, change: Callable[[int, pydicom.Dataset], None] | None = None, drop: tuple[int, ...] = ()
    ) -> Path:
        folder = tmp_path / name
        for k, ds in enumerate(series_from_nifti(nib.load(src))):
            if k in drop:
                continue
            if change is not None:
                change(k, ds)
            write_series([ds], folder)
        return folder

    def tilt(k: int, ds: pydicom.Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.3 * k, z]

    def rotate(k: int, ds: pydicom.Dataset) -> None:
        if k == 3:
            ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]

    def multiframe(k: int, ds: pydicom.Dataset) -> None:
        ds.NumberOfFrames = 2

    def duplicate(k: int, ds: pydicom.Dataset) -> None:
        if k == 5:
            ds.ImagePositionPatient = series_from_nifti(nib.load(src))[4].ImagePositionPatient

    cases = {
        "missing": (variant("missing", drop=(n // 2,)), 422, "about 1 slice(s) missing"),
        "tilt": (variant("tilt", tilt), 422, "gantry tilt"),
        "orientation": (variant("orientation", rotate), 422, "more than one orientation"),
        "multiframe": (variant("multiframe", multiframe), 422, "multi-frame"),
        "duplicate": (variant("duplicate", duplicate), 422, "same slice position"),
        "single": (variant("single", drop=tuple(range(1, n))), 422, "at least 2 slices"),
    }
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "readme.txt").write_text("x" * 200)
    cases["not dicom"] = (tmp_path / "notdicom", 400, "no DICOM files")
    for what, (folder, status, words) in cases.items():
        with pytest.raises(InputError) as info:
            read_folder(folder)
        assert info.value.status == status and words in str(info.value), (what, str(info.value))
        assert str(folder) in str(info.value), what
    # two series in one folder: refused with both listed, then chosen by --series
    other = make_series(src, tmp_path / "two", description="second")
    write_series(datasets, tmp_path / "two" / "first")
    with pytest.raises(InputError, match="2 series; choose one") as info:
        read_folder(tmp_path / "two")
    assert datasets[0].SeriesInstanceUID in str(info.value) and other[0].SeriesInstanceUID in str(info.value)
    assert read_folder(tmp_path / "two", str(other[0].SeriesInstanceUID)).series_uid == other[0].SeriesInstanceUID
    # archives: too many entries, a zip bomb by declared size, not a zip; limits apply before anything is decoded
    raw = zipped(base)
    with pytest.raises(InputError, match="above the limit of 5") as info:
        read_zip(raw, "up.zip", max_files=5)
    assert info.value.status == 413
    with pytest.raises(InputError, match="uncompressed") as info:
        read_zip(raw, "up.zip", max_bytes=10_000)
    assert info.value.status == 413
    with pytest.raises(InputError, match="not a readable zip") as info:
        read_zip(b"PK\x03\x04 not really", "up.zip")
    assert info.value.status == 400
    with pytest.raises(InputError, match="above the limit of 100") as info:
        read_zip(raw, "up.zip", max_voxels=100)
    assert info.value.status == 413


def test_predict_dicom_folder_writes_a_valid_seg_equal_to_the_nifti_path(
    cli, trained_synth: TrainedModel, synth_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlops predict FOLDER -t both`: a SEG that dciodvfy passes and whose labels equal `mlops predict` on the same
    scan as NIfTI (converted by SimpleITK); the NIfTI written beside it is that segmentation too."""
    monkeypatch.setenv("MLOPS_DATA_DIR", str(trained_synth.workspace.root))
    series_dir = tmp_path / "series"
    make_series(synth_task / "imagesTs" / CASE, series_dir, patient_id="MRN12345")
    model = ["--model", str(trained_synth.model_dir), "--no-tta"]
    result = cli.invoke(app, ["predict", str(series_dir), "-t", "both", "--json", *model])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    seg_file, nii_file = (tmp_path / "series_seg.dcm"), (tmp_path / "series_seg.nii.gz")
    assert row["outputs"] == [str(seg_file), str(nii_file)] and row["volumes_mm3"]["Anterior"] > 0
    reference = simpleitk_nifti(series_dir, tmp_path / "sitk.nii.gz")
    result = cli.invoke(app, ["predict", str(reference), "-o", str(tmp_path / "ref_seg.nii.gz"), *model])
    assert result.exit_code == 0, result.output
    expected = nib.load(tmp_path / "ref_seg.nii.gz")
    assert_seg_matches(seg_file, series_dir, np.asanyarray(expected.dataobj), expected.affine)
    np.testing.assert_array_equal(np.asanyarray(nib.load(nii_file).dataobj), np.asanyarray(expected.dataobj))
    # no output inside the input series (the SEG would join it), no SEG from a NIfTI input
    result = cli.invoke(app, ["predict", str(series_dir), "-o", str(series_dir / "seg.dcm"), *model])
    assert result.exit_code == 1 and "inside the input" in result.output
    result = cli.invoke(app, ["predict", str(reference), "-t", "dicom-seg", *model])
    assert result.exit_code == 2 and "need a DICOM series" in result.output


@pytest.fixture(scope="module")
def dicom_server(trained_synth: TrainedModel, orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory,
                 monkeypatch_module: pytest.MonkeyPatch) -> Iterator[str]:  # fmt: skip
    """The service in process, with the session's Orthanc as its PACS (credentials from the environment)."""
    tmpdir = tmp_path_factory.mktemp("dicom_server")
    monkeypatch_module.setenv("MLOPS_DATA_DIR", str(trained_synth.workspace.root))
    for key, value in orthanc.env().items():
        monkeypatch_module.setenv(key, value)
    overrides = [f"predict.model_dir={trained_synth.model_dir}", "predict.tta=false", f"dicom.url={orthanc.dicomweb}",
                 f"monitor.store={tmpdir / 'monitoring'}"]  # fmt: skip
    with serve_in_process(overrides, tmpdir) as url:
        yield url


def test_zip_upload_returns_a_seg_or_nifti(dicom_server: str, synth_task: Path, tmp_path: Path) -> None:
    series_dir = tmp_path / "series"
    make_series(synth_task / "imagesTs" / CASE, series_dir)
    raw = zipped(series_dir)

    def post(name: str, body: bytes, **kw: object) -> httpx.Response:
        return httpx.post(f"{dicom_server}/predict", files={"file": (name, body)}, timeout=120, **kw)  # type: ignore

    seg = post("series.zip", raw, headers={"Accept": "application/dicom"})
    assert seg.status_code == 200, seg.text
    assert seg.headers["content-type"] == "application/dicom"
    assert 'filename="series_seg.dcm"' in seg.headers["content-disposition"]
    (tmp_path / "seg.dcm").write_bytes(seg.content)
    nifti = post("series.zip", raw, params={"format": "nifti"})
    assert nifti.status_code == 200 and nifti.headers["content-type"] == "application/gzip"
    img = nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content))
    assert_seg_matches(tmp_path / "seg.dcm", series_dir, np.asanyarray(img.dataobj), img.affine)
    assert json.loads(seg.headers["x-label-volumes-mm3"]) == json.loads(nifti.headers["x-label-volumes-mm3"])
    # a SEG needs DICOM input; a broken archive and a bad series are 4xx, never 5xx
    nii = (synth_task / "imagesTs" / CASE).read_bytes()
    assert post(CASE, nii, headers={"Accept": "application/dicom"}).status_code == 406
    assert post("series.zip", b"PK\x03\x04garbage").status_code == 400
    missing = zipfile.ZipFile(io.BytesIO(raw))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for k, info in enumerate(missing.infolist()):
            if k != 7:
                z.writestr(info, missing.read(info))
    resp = post("series.zip", buffer.getvalue())
    assert resp.status_code == 422 and "missing" in resp.json()["detail"]


def test_to_dicom_stores_a_series_the_pacs_serves(cli, orthanc: Orthanc, synth_task: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The README's first DICOM command: a NIfTI scan into the PACS, its dicomweb:// URL printed and retrievable."""
    for key, value in orthanc.env().items():
        monkeypatch.setenv(key, value)
    src = synth_task / "imagesTs" / CASE
    result = cli.invoke(app, ["to-dicom", str(src), "-o", str(tmp_path / "s"), "--store", orthanc.dicomweb])
    assert result.exit_code == 0, result.output
    url = result.stdout.strip().splitlines()[-1]
    got = web.retrieve_series(web.parse_url(url), 1000)
    assert len(got) == nib.load(src).shape[2] == len(list((tmp_path / "s").iterdir()))
    result = cli.invoke(app, ["to-dicom", str(src), "-o", str(tmp_path / "s")])
    assert result.exit_code == 1 and "not an empty folder" in result.output


def test_pacs_round_trip(
    dicom_server: str, orthanc: Orthanc, cli, trained_synth: TrainedModel, synth_task: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A series stored in Orthanc -> the service pulls it (WADO-RS), segments it and stores the SEG (STOW-RS) -> the
    SEG is found by QIDO-RS, passes dciodvfy and equals the NIfTI path on the same scan; no patient data is logged.
    Then `mlops predict dicomweb://... --store` does the same from the command line."""
    for key, value in orthanc.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLOPS_DATA_DIR", str(trained_synth.workspace.root))
    real = SHARED / "Task04_Hippocampus" / "imagesTs" / REAL_CASE
    src = real if real.is_file() else synth_task / "imagesTs" / CASE  # a real scan where the shared data is
    series_dir = tmp_path / "series"
    datasets = make_series(src, series_dir, patient_id="MRN12345")
    for ds in datasets:
        ds.PatientName = "Doe^John"
    write_series(datasets, series_dir)
    web.store(orthanc.dicomweb, datasets)
    study, series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    logs: list[str] = []
    sink = logger.add(logs.append, level="DEBUG")
    try:
        t0 = time.perf_counter()
        resp = httpx.post(f"{dicom_server}/dicomweb/segment", json={"study": study, "series": series}, timeout=300)
        round_trip = time.perf_counter() - t0
        assert resp.status_code == 200, resp.text
        body = resp.json()
        t0 = time.perf_counter()
        nifti = httpx.post(f"{dicom_server}/predict", files={"file": ("c.nii.gz", src.read_bytes())}, timeout=300)
        nifti_path = time.perf_counter() - t0
        assert nifti.status_code == 200
        missing = httpx.post(f"{dicom_server}/dicomweb/segment", json={"study": study, "series": "1.2.3"}, timeout=60)
        assert missing.status_code == 404 and "1.2.3" in missing.json()["detail"]
        hostile = httpx.post(f"{dicom_server}/dicomweb/segment", json={"study": "../x", "series": "1"}, timeout=60)
        assert hostile.status_code == 422
    finally:
        logger.remove(sink)
    logger.info(f"DICOM round trip {round_trip:.2f} s ({body['seconds']}) vs NIfTI upload {nifti_path:.2f} s")
    assert body["series"] == series and body["stored"].endswith(body["seg_series"])
    found = web.find_series(orthanc.dicomweb, study, "SEG")
    assert [s["0020000E"]["Value"][0] for s in found] == [body["seg_series"]]
    stored = web.retrieve_series(web.SeriesRef(orthanc.dicomweb, study, body["seg_series"]), 10)
    assert len(stored) == 1 and str(stored[0].SOPInstanceUID) == body["seg_sop_instance"]
    seg_file = tmp_path / "pacs_seg.dcm"
    stored[0].save_as(seg_file, enforce_file_format=True)
    reference = simpleitk_nifti(series_dir, tmp_path / "sitk.nii.gz")
    result = cli.invoke(app, ["predict", str(reference), "-o", str(tmp_path / "ref_seg.nii.gz"),
                              "--model", str(trained_synth.model_dir), "--no-tta"])  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = nib.load(tmp_path / "ref_seg.nii.gz")
    assert_seg_matches(seg_file, series_dir, np.asanyarray(expected.dataobj), expected.affine)
    text = "\n".join(logs)
    assert "Doe" not in text and "MRN12345" not in text
    # the command line: pull, segment, store back; unreachable and unauthorised PACS are one line, exit 1
    url = web.SeriesRef(orthanc.dicomweb, study, series).url
    result = cli.invoke(app, ["predict", url, "--store", "--json", "--model", str(trained_synth.model_dir), "--no-tta"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["outputs"] == [] and row["stored"].startswith("dicomweb://127.0.0.1")
    assert len(web.find_series(orthanc.dicomweb, study, "SEG")) == 2
    down = url.replace(f":{orthanc.port}/", ":1/")
    result = cli.invoke(app, ["predict", down, "--model", str(trained_synth.model_dir)])
    assert result.exit_code == 1 and "could not be reached" in result.output
    monkeypatch.setenv("MLOPS_DICOMWEB_PASSWORD", "wrong")
    result = cli.invoke(app, ["predict", url, "--model", str(trained_synth.model_dir)])
    assert result.exit_code == 1 and "authentication failed" in result.output


def test_batch_segments_zipped_series_with_their_seg(
    trained_synth: TrainedModel, synth_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mlops batch` lists a zipped DICOM series as a case (named by its archive) and its segmenting actor writes the
    NIfTI and the SEG of it, equal to each other. The actor runs in this process here: Ray only carries the rows
    (the batch tests run the same actor under Ray for NIfTI)."""
    from mlops.batch.sources import list_cases
    from mlops.batch.worker import SegmentActor, read_input
    from mlops.config import load_config

    monkeypatch.setenv("MLOPS_DATA_DIR", str(trained_synth.workspace.root))
    cohort = tmp_path / "cohort"
    series_dir = tmp_path / "series"
    make_series(synth_task / "imagesTs" / CASE, series_dir)
    cohort.mkdir()
    (cohort / "study7.zip").write_bytes(zipped(series_dir))
    (cohort / "broken.zip").write_bytes(b"PK\x03\x04 no archive")
    (cohort / CASE).write_bytes((synth_task / "imagesTs" / CASE).read_bytes())
    cases = list_cases(str(cohort), str(tmp_path / "out"))
    assert [c.case for c in cases] == ["broken", "study7", "synth_008"]
    cfg = load_config([f"predict.model_dir={trained_synth.model_dir}", "predict.tta=false"])
    actor = SegmentActor(cfg, str(trained_synth.model_dir), None, "sha", "run")
    rows = [read_input(c.to_row(), model_sha256="sha", tta=False, force=False, run_id="run") for c in cases]
    out = actor({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    status = dict(zip(out["case"], out["status"], strict=True))
    assert status == {"broken": "failed", "study7": "ok", "synth_008": "ok"}, out["error"]
    assert "not a readable zip" in out["error"][0]
    seg_file = tmp_path / "out" / "study7.dcm"
    assert out["seg"] == [None, str(seg_file), None]
    img = nib.load(tmp_path / "out" / "study7.nii.gz")
    assert_seg_matches(seg_file, series_dir, np.asanyarray(img.dataobj), img.affine)


@pytest.mark.usefixtures("chromium")
def test_page_opens_a_pacs_series_and_stores_its_seg(
    dicom_server: str, orthanc: Orthanc, synth_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page (headless Chromium, every host but 127.0.0.1 blocked) offers the PACS when one is configured: a
    series opened by its UIDs is shown and segmented (volumes as the API's SEG route gives them), and stored back as
    a SEG that Orthanc then lists in the study."""
    from .browser import Browser

    for key, value in orthanc.env().items():
        monkeypatch.setenv(key, value)
    datasets = series_from_nifti(nib.load(synth_task / "imagesTs" / CASE))
    web.store(orthanc.dicomweb, datasets)
    study, series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    expected = httpx.post(f"{dicom_server}/dicomweb/segment", json={"study": study, "series": series, "store": False},
                          timeout=120).json()["volumes_mm3"]  # fmt: skip
    volume = httpx.get(f"{dicom_server}/dicomweb/studies/{study}/series/{series}/volume", timeout=120)
    assert volume.status_code == 200 and volume.headers["content-type"] == "application/gzip"
    assert httpx.get(f"{dicom_server}/dicomweb/studies/{study}/series/1.2.3/volume", timeout=60).status_code == 404
    with Browser(tmp_path / "profile") as b:
        b.goto(f"{dicom_server}/")
        b.wait_for("document.body.dataset.state === 'idle'", 60)
        assert b.evaluate("!document.getElementById('pacs-box').hidden")
        b.evaluate(f"document.getElementById('pacs-study').value = {json.dumps(study)};"
                   f"document.getElementById('pacs-series').value = {json.dumps(series)};"
                   "document.getElementById('pacs-open').click()")  # fmt: skip
        finished = "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
        assert b.wait_for(finished, 180) == "done", b.evaluate("document.getElementById('error').textContent")
        volumes = b.evaluate(
            "Object.fromEntries([...document.querySelectorAll('#volumes tbody tr')]"
            ".map(r => [r.dataset.label, Number(r.dataset.mm3)]))"
        )
        b.evaluate("document.getElementById('pacs-store').click()")
        stored = b.wait_for("(p => !p.hidden && p.textContent)(document.getElementById('pacs-stored'))", 180)
        b.screenshot(tmp_path / "page_pacs.png")
        outside = [u for u in b.requested_urls() if not u.startswith(("http://127.0.0.1:", "blob:", "data:"))]
        errors = b.console_errors()
    assert volumes == pytest.approx(expected, abs=1e-3), (volumes, expected)
    segs = [s["0020000E"]["Value"][0] for s in web.find_series(orthanc.dicomweb, study, "SEG")]
    assert len(segs) == 1 and segs[0] in stored, stored
    assert not outside and not errors, (outside, errors)
