"""The /predict service: a real uvicorn server on 127.0.0.1 (started by `mlops serve`) and a real HTTP client."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from .conftest import HIPPOCAMPUS, TrainedModel, run_mlops, serve_in_process

MAX_BYTES = 3_000_000
MAX_VOXELS = 2_000_000
MAX_IN_FLIGHT = 3


@dataclass
class Server:
    url: str
    tmpdir: Path
    model_dir: Path


@pytest.fixture(scope="module")
def server(
    trained_synth: TrainedModel, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[Server]:
    """The service on 127.0.0.1 in this process (the real uvicorn server `mlops serve` runs; test_hostile and
    test_faults start `mlops serve` itself, where the process is the point)."""
    tmpdir = tmp_path_factory.mktemp("server_tmp")
    monkeypatch_module.setenv("MLOPS_DATA_DIR", str(trained_synth.workspace.root))
    overrides = [f"predict.model_dir={trained_synth.model_dir}", "predict.tta=false",
                 f"monitor.store={tmpdir.parent / 'monitoring'}", f"serve.max_upload_bytes={MAX_BYTES}",
                 f"serve.max_voxels={MAX_VOXELS}", f"serve.max_in_flight={MAX_IN_FLIGHT}"]  # fmt: skip
    with serve_in_process(overrides, tmpdir) as url:
        yield Server(url, tmpdir, trained_synth.model_dir)


def post(server: Server, name: str, body: bytes, **params: object) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", files={"file": (name, body)}, params=params, timeout=120)


def decode(resp: httpx.Response) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(resp.content))


def cli_segmentation(trained: TrainedModel, src: Path, out: Path) -> np.ndarray:
    proc = run_mlops(
        "predict", str(src), "-o", str(out), f"predict.model_dir={trained.model_dir}", "predict.tta=false",
        env=trained.workspace.env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.asanyarray(nib.load(out).dataobj)


def assert_good(server: Server, src: Path) -> np.ndarray:
    resp = post(server, src.name, src.read_bytes())
    assert resp.status_code == 200, resp.text
    return np.asanyarray(decode(resp).dataobj)


def test_health_ready_docs(server: Server) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["ready"] is True and ready["model"] == server.model_dir.name and ready["folds"] == ["0"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    assert "/predict" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_predict_matches_cli_and_geometry(
    server: Server, trained_synth: TrainedModel, synth_task: Path, tmp_path: Path
) -> None:
    src = synth_task / "imagesTs" / "synth_009.nii.gz"
    resp = post(server, src.name, src.read_bytes())
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/gzip"
    assert resp.headers["content-disposition"] == 'attachment; filename="synth_009_seg.nii.gz"'
    volumes = json.loads(resp.headers["x-label-volumes-mm3"])
    seg_img, src_img = decode(resp), nib.load(src)
    seg = np.asanyarray(seg_img.dataobj)
    assert seg_img.shape == src_img.shape
    np.testing.assert_array_equal(seg_img.affine, src_img.affine)
    assert int(seg_img.header["sform_code"]) == int(src_img.header["sform_code"])
    voxel = float(np.prod(src_img.header.get_zooms()))
    assert volumes == {
        "Anterior": pytest.approx((seg == 1).sum() * voxel, abs=1e-3),
        "Posterior": pytest.approx((seg == 2).sum() * voxel, abs=1e-3),
    }
    np.testing.assert_array_equal(seg, cli_segmentation(trained_synth, src, tmp_path / "cli.nii.gz"))


def test_uncompressed_upload_and_tta_flag(server: Server, synth_task: Path) -> None:
    src = synth_task / "imagesTs" / "synth_008.nii.gz"
    plain = nib.load(src).to_bytes()
    without = post(server, "case.nii", plain, tta="false")
    with_tta = post(server, "case.nii", plain, tta="true")
    assert without.status_code == with_tta.status_code == 200
    assert float(with_tta.headers["x-inference-seconds"]) > float(without.headers["x-inference-seconds"])


def _nii(data: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes())


def _bomb() -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000))
    header.set_data_dtype(np.uint8)
    return gzip.compress(header.binaryblock + b"\x00" * 4 + b"\x00" * 100_000)


BAD_INPUTS = {
    "not-nifti": ("scan.nii.gz", lambda src: b"definitely not a NIfTI volume" * 50, 400, "not a NIfTI"),
    "truncated-gzip": ("scan.nii.gz", lambda src: src[: len(src) // 2], 400, "truncated"),
    "2d": ("scan.nii.gz", lambda src: _nii(np.zeros((30, 30), np.float32)), 422, "2D image"),
    "4d": ("scan.nii.gz", lambda src: _nii(np.zeros((20, 20, 20, 3), np.float32)), 422, "single-channel 3D"),
    "nan": ("scan.nii.gz", lambda src: _nii(np.full((20, 20, 20), np.nan, np.float32)), 422, "NaN"),
    "empty": ("scan.nii.gz", lambda src: b"", 400, "empty file"),
    "too-many-bytes": ("scan.nii.gz", lambda src: os.urandom(MAX_BYTES + 10_000), 413, "above the limit"),
    "voxel-bomb": ("bomb.nii.gz", lambda src: _bomb(), 413, "above the limit"),
    "wrong-extension": ("scan.txt", lambda src: src, 400, "expected a .nii or .nii.gz"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_4xx_and_server_survives(server: Server, synth_task: Path, case: str) -> None:
    name, make, status, message = BAD_INPUTS[case]
    good = synth_task / "imagesTs" / "synth_008.nii.gz"
    resp = post(server, name, make(good.read_bytes()))
    assert resp.status_code == status, resp.text
    assert message in resp.json()["detail"]
    assert_good(server, good)  # the next good request still works


def test_missing_file_field(server: Server) -> None:
    resp = httpx.post(f"{server.url}/predict", data={"x": "1"})
    assert resp.status_code == 422 and resp.json()["detail"]


def test_concurrent_clients_all_correct(server: Server, synth_task: Path) -> None:
    sources = [synth_task / "imagesTs" / n for n in ("synth_008.nii.gz", "synth_009.nii.gz")]
    expected = {s.name: assert_good(server, s) for s in sources}
    jobs = [sources[i % 2] for i in range(MAX_IN_FLIGHT)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda s: (s, post(server, s.name, s.read_bytes())), jobs))
    for src, resp in responses:
        assert resp.status_code == 200, resp.text
        np.testing.assert_array_equal(np.asanyarray(decode(resp).dataobj), expected[src.name])


def test_overload_gets_503_not_a_crash(server: Server, synth_task: Path) -> None:
    src = synth_task / "imagesTs" / "synth_009.nii.gz"
    body = src.read_bytes()
    expected_resp = post(server, src.name, body, tta="true")
    assert expected_resp.status_code == 200
    expected = np.asanyarray(decode(expected_resp).dataobj)
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: post(server, src.name, body, tta="true"), range(12)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) <= {200, 503} and 503 in codes and codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
        else:
            np.testing.assert_array_equal(np.asanyarray(decode(r).dataobj), expected)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert_good(server, src)


def test_metrics_and_no_temp_files(server: Server, synth_task: Path) -> None:
    before = sorted(server.tmpdir.rglob("*"))  # wandb (imported by nnU-Net's logger) makes its own dirs at import
    assert_good(server, synth_task / "imagesTs" / "synth_008.nii.gz")
    post(server, "big.nii", nib.Nifti1Image(np.zeros((90, 90, 90), np.float32), np.eye(4)).to_bytes())  # > 1 MiB
    post(server, "x.nii.gz", b"")
    text = httpx.get(f"{server.url}/metrics").text
    assert 'mlops_http_requests_total{method="POST",path="/predict",status="200"}' in text
    assert 'mlops_http_errors_total{status="400"}' in text
    assert "mlops_predict_in_flight 0.0" in text
    assert "mlops_inference_duration_seconds_count" in text
    assert sorted(server.tmpdir.rglob("*")) == before  # uploads are decoded in memory: no files left behind


@pytest.mark.real_data
@pytest.mark.slow  # a real-scan sweep: the slow tier
def test_real_hippocampus_cases(server: Server, trained_synth: TrainedModel, tmp_path: Path) -> None:
    if not HIPPOCAMPUS.is_dir():
        pytest.skip(f"real data absent: {HIPPOCAMPUS}")
    for src in sorted((HIPPOCAMPUS / "imagesTs").glob("*.nii.gz"))[:3]:
        resp = post(server, src.name, src.read_bytes())
        assert resp.status_code == 200, resp.text
        seg_img, src_img = decode(resp), nib.load(src)
        assert seg_img.shape == src_img.shape
        np.testing.assert_array_equal(seg_img.affine, src_img.affine)
        cli = cli_segmentation(trained_synth, src, tmp_path / src.name)
        np.testing.assert_array_equal(np.asanyarray(seg_img.dataobj), cli)


def test_model_fetched_from_uri(trained_synth: TrainedModel, tmp_path: Path) -> None:
    """serve.model_uri goes through fsspec: gs:// in production (GCS cannot be reached here), file:// in this test."""
    from mlops.api import fetch_model
    from mlops.config import load_config

    cfg = load_config([f"serve.model_uri=file://{trained_synth.model_dir}", f"serve.model_cache={tmp_path}"])
    folder = fetch_model(cfg)
    assert folder == tmp_path / trained_synth.model_dir.name
    assert (folder / "plans.json").is_file() and (folder / "fold_0" / "checkpoint_final.pth").is_file()
    assert fetch_model(cfg) == folder  # cached


def test_served_volumes_feed_the_drift_report(
    server: Server, trained_synth: TrainedModel, synth_task: Path, tmp_path: Path
) -> None:
    """The service stores each request's statistics (no file name) under the model's key in monitor.store;
    `mlops drift --current requests` reads them and compares them with the profile training wrote."""
    assert_good(server, synth_task / "imagesTs" / "synth_008.nii.gz")
    store = server.tmpdir.parent / "monitoring"
    files = list(store.rglob("*.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    assert rows and "case" not in rows[-1] and "intensity_p99" in rows[-1] and "confidence_overall" in rows[-1]
    args = ["drift", str(synth_task), "--current", "requests", f"predict.model_dir={trained_synth.model_dir}",
            f"paths.reports={tmp_path}", f"monitor.store={store}"]  # fmt: skip
    proc = run_mlops(*args, env=trained_synth.workspace.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "drift_requests_summary.json").read_text())
    assert summary["current_rows"] == len(rows) and summary["reference_rows"] == 8
    assert (tmp_path / "drift_requests.html").is_file() and not (tmp_path / "drift_train_vs_test.html").exists()
