"""Hostile input, as an outsider would send it: crafted NIfTI headers (built here with ``struct``), small uploads
that inflate to huge volumes or huge work, mutated headers and an API fuzz run (schemathesis).

One real `mlops serve` on 127.0.0.1 for the module, with the production limits of configs/config.yaml (upload
256 MiB, 64 M voxels, 1 GiB working-memory budget). Each case asserts the status and message, that a good request
still succeeds afterwards, that the server's peak RSS stayed under ``RSS_BOUND``, and that its log holds no
traceback and no voxel data.
"""

from __future__ import annotations

import gzip
import math
import re
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from .conftest import TrainedModel, free_port, run_mlops, wait_ready

# Peak RSS of the whole server process (VmHWM: the high-water mark over its life, model included). Measured here:
# 0.87-0.98 GiB after the model loads and every case below; before the fixes one complex128 upload took it to 2.7 GB.
RSS_BOUND = 2 * 2**30  # measured 1.54 GiB with the engine's 8 patches per forward pass; Cloud Run's 4 GiB hold two

# ------------------------------------------------------------------------------ NIfTI-1 headers built with struct
# (offset, struct format) of the NIfTI-1 header fields these tests set; everything else stays zero.
FIELDS: dict[str, tuple[int, str]] = {
    "sizeof_hdr": (0, "i"),
    "dim": (40, "8h"),
    "datatype": (70, "h"),
    "bitpix": (72, "h"),
    "pixdim": (76, "8f"),
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
    "xyzt_units": (123, "B"),
    "qform_code": (252, "h"),
    "sform_code": (254, "h"),
    "quatern": (256, "6f"),
    "srow_x": (280, "4f"),
    "srow_y": (296, "4f"),
    "srow_z": (312, "4f"),
    "magic": (344, "4s"),
}
DTYPES = {2: ("uint8", 8), 4: ("int16", 16), 16: ("float32", 32), 64: ("float64", 64), 1792: ("complex128", 128)}


def header(shape: tuple[int, ...] = (16, 16, 16), datatype: int = 16, spacing: float = 1.0, **fields: object) -> bytes:
    """A NIfTI-1 single-file header (348 bytes + the 4-byte extension flag), valid unless ``fields`` say otherwise."""
    values: dict[str, object] = {
        "sizeof_hdr": 348,
        "dim": (len(shape), *shape, *([1] * (7 - len(shape)))),
        "datatype": datatype,
        "bitpix": DTYPES.get(datatype, ("", 32))[1],
        "pixdim": (1.0, *([spacing] * 3), 1.0, 1.0, 1.0, 1.0),
        "vox_offset": 352.0,
        "scl_slope": 1.0,
        "scl_inter": 0.0,
        "xyzt_units": 2,  # mm
        "qform_code": 0,
        "sform_code": 1,
        "quatern": (0.0,) * 6,
        "srow_x": (spacing, 0.0, 0.0, 0.0),
        "srow_y": (0.0, spacing, 0.0, 0.0),
        "srow_z": (0.0, 0.0, spacing, 0.0),
        "magic": b"n+1\0",
    }
    values.update(fields)
    block = bytearray(352)
    for name, value in values.items():
        offset, fmt = FIELDS[name]
        args = value if isinstance(value, tuple) else (value,)
        struct.pack_into("<" + fmt, block, offset, *args)
    return bytes(block)


def volume(shape: tuple[int, ...] = (16, 16, 16), datatype: int = 16, **fields: object) -> bytes:
    """Header plus real voxel data (a bright blob on a noisy background), uncompressed."""
    dtype = np.dtype(DTYPES.get(datatype, ("float32", 32))[0])  # an unknown code keeps float32 data behind it
    grid = np.indices(shape[:3]).astype(np.float32)
    centre = np.array(shape[:3], np.float32).reshape(3, 1, 1, 1) / 2
    blob = 100 * (((grid - centre) ** 2).sum(0) < (min(shape[:3]) / 4) ** 2)
    noise = np.random.default_rng(0).normal(20, 5, shape[:3])
    data = np.asarray(blob + noise).astype(dtype)
    return header(shape, datatype, **fields) + data.tobytes(order="F")


def gzip_of_constant(head: bytes, nbytes: int, byte: int) -> bytes:
    """gzip of ``head`` followed by ``nbytes`` copies of ``byte``, compressed in chunks (never all in memory)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes([byte]) * (64 << 20)
    out = [comp.compress(head)]
    for start in range(0, nbytes, len(chunk)):
        out.append(comp.compress(chunk[: min(len(chunk), nbytes - start)]))
    out.append(comp.flush())
    return b"".join(out)


# --------------------------------------------------------------------------------------------- the server
@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def start_server(trained: TrainedModel, tmpdir: Path, *overrides: str) -> Iterator[Server]:
    """`mlops serve` on 127.0.0.1 with the trained synthetic model; stopped (SIGTERM) when the generator closes."""
    port = free_port()
    env = trained.workspace.env()
    env.update(PORT=str(port), TMPDIR=str(tmpdir))
    exe = Path(sys.executable).parent / "mlops"
    store = f"monitor.store={tmpdir.parent / (tmpdir.name + '_monitoring')}"  # not the cached model's data root
    args = ["serve", f"predict.model_dir={trained.model_dir}", "predict.tta=false", store, *overrides]
    log = tmpdir.parent / f"{tmpdir.name}.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([str(exe), *args], env=env, stdout=sink, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log)
        try:
            yield Server(url, proc, log)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(trained_synth: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(trained_synth, tmp_path_factory.mktemp("hostile_tmp"))


@pytest.fixture(scope="module")
def good_case(synth_task: Path) -> bytes:
    return (synth_task / "imagesTs" / "synth_008.nii.gz").read_bytes()


def post(server: Server, name: str, body: bytes, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", files={"file": (name, body)}, timeout=timeout)


NUMBERS = re.compile(r"(?:[-+]?\d+\.\d+(?:e[-+]?\d+)?[,\s]+){12,}")  # a dozen floats in a row: an array printout


def assert_clean_log(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]
    assert "array(" not in text and not NUMBERS.search(text), "voxel data in the log"


def assert_survives(server: Server, good: bytes) -> None:
    """The next good request still succeeds; memory stayed bounded; nothing ugly in the log."""
    resp = post(server, "good.nii.gz", good)
    assert resp.status_code == 200, resp.text
    assert resp.content[:2] == b"\x1f\x8b"
    assert server.peak_rss() < RSS_BOUND, f"peak RSS {server.peak_rss() / 2**30:.2f} GiB"
    assert_clean_log(server.log.read_text())


# ------------------------------------------------------------------------ item 3: malformed headers -> 4xx
MALFORMED = {
    "negative-dim-gz": (
        lambda: gzip.compress(header(dim=(3, -16, 16, 16, 1, 1, 1, 1)) + b"\0" * 16384),
        400,
        "negative dimension",
    ),
    "dim0-9": (lambda: header(dim=(9, 16, 16, 16, 1, 1, 1, 1)) + b"\0" * 16384, 400, "dim[0]=9"),
    "vox-offset-huge": (lambda: header(vox_offset=3e38) + b"\0" * 16384, 400, "vox_offset"),
    "vox-offset-negative": (lambda: header(vox_offset=-1000.0) + b"\0" * 16384, 400, "vox_offset"),
    "vox-offset-nan": (lambda: header(vox_offset=math.nan) + b"\0" * 16384, 400, "vox_offset"),
    "datatype-9999": (lambda: header(datatype=9999) + b"\0" * 16384, 400, "datatype code 9999"),
    "spacing-nan": (lambda: volume(pixdim=(1.0, math.nan, 1.0, 1.0, 1, 1, 1, 1)), 422, "spacing"),
    "spacing-1e-6": (lambda: volume(spacing=1e-6), 422, "less than one voxel"),
    "spacing-300mm": (lambda: volume(spacing=300.0), 413, "working memory"),
    "scl-slope-3e38": (lambda: volume(datatype=4, scl_slope=3e38), 422, "float32 range"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_header_is_4xx(server: Server, good_case: bytes, case: str) -> None:
    make, status, message = MALFORMED[case]
    resp = post(server, "crafted.nii.gz", make())
    assert resp.status_code == status, resp.text
    assert message in resp.json()["detail"] and "crafted.nii.gz" in resp.json()["detail"]
    assert_survives(server, good_case)


# ------------------------------------------------------- item 2: small uploads that would cost memory or time
def test_complex128_bomb_refused_before_inflating(server: Server, good_case: bytes) -> None:
    """~1 MB of gzip inflating to a 1 GB complex128 400³ volume; two at once. Refused from the header."""
    body = gzip_of_constant(header((400, 400, 400), 1792), 400**3 * 16, 0)
    assert len(body) < 2_000_000
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: post(server, "c128.nii.gz", body), range(2)))
    for resp in responses:
        assert resp.status_code == 422, resp.text
        assert "complex128" in resp.json()["detail"] and "not supported" in resp.json()["detail"]
    assert_survives(server, good_case)


def test_uint8_ones_400_cubed_refused_by_budget(server: Server, good_case: bytes) -> None:
    """62 KB of gzip, 64 M voxels (inside serve.max_voxels): the working memory at the model's grid is the limit."""
    body = gzip_of_constant(header((400, 400, 400), 2), 400**3, 1)
    assert len(body) < 100_000
    resp = post(server, "ones.nii.gz", body)
    assert resp.status_code == 413, resp.text
    detail = resp.json()["detail"]
    assert "working memory" in detail and "MiB" in detail and "(400, 400, 400)" in detail
    assert_survives(server, good_case)


def test_coarse_voxels_cost_counted_at_model_grid(server: Server, good_case: bytes) -> None:
    """16³ voxels of 3 mm are 48³ at the model's ~1 mm grid: within the budget, so segmented."""
    t0 = time.monotonic()
    resp = post(server, "coarse.nii", volume(spacing=3.0))
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - t0 < 120
    assert_survives(server, good_case)


# ------------------------------------------------------------------------- item 4: valid files once refused
def test_multi_member_gzip_and_upper_case_suffix(server: Server, good_case: bytes) -> None:
    raw = gzip.decompress(good_case)
    multi = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])  # what `cat a.gz b.gz` or pigz can produce
    for name, body in (("multi.nii.gz", multi), ("CASE.NII.GZ", good_case)):
        resp = post(server, name, body)
        assert resp.status_code == 200, (name, resp.text)
        assert gzip.decompress(resp.content)[:4] == struct.pack("<i", 348)
    assert resp.headers["content-disposition"] == 'attachment; filename="CASE_seg.nii.gz"'
    assert_survives(server, good_case)


# ---------------------------------------------------------------------------- item 6: the smaller ones
def test_scl_slope_beyond_float32_is_refused_not_blank(server: Server, good_case: bytes) -> None:
    resp = post(server, "slope.nii", volume(datatype=4, scl_slope=3e38))
    assert resp.status_code == 422 and "scl_slope" in resp.json()["detail"]
    assert_survives(server, good_case)


def test_metrics_documented_as_text(server: Server) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    content = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "application/json" not in content and any(k.startswith("text/plain") for k in content)
    assert httpx.get(f"{server.url}/metrics").headers["content-type"].startswith("text/plain")


def test_serve_leaves_no_wandb_temp_folders(server: Server) -> None:
    """Importing wandb (nnU-Net's logger offers it) made wandb-media/wandb-artifacts in $TMPDIR on every start."""
    tmpdir = server.log.with_suffix("")
    assert tmpdir.is_dir() and not list(tmpdir.glob("*wandb*"))


# ------------------------------------------------------------------------- mutated headers: API and CLI
BOUNDARY: dict[str, list[object]] = {
    "sizeof_hdr": [0, -1, 347, 349, 540, 2**31 - 1],
    "dim": [(0, 16, 16, 16, 1, 1, 1, 1), (-1, 16, 16, 16, 1, 1, 1, 1), (8, 16, 16, 16, 1, 1, 1, 1),
            (3, 0, 16, 16, 1, 1, 1, 1), (3, -1, 16, 16, 1, 1, 1, 1), (3, 32767, 32767, 32767, 1, 1, 1, 1),
            (3, -32768, 16, 16, 1, 1, 1, 1), (4, 16, 16, 16, 32767, 1, 1, 1), (2, 16, 16, 16, 1, 1, 1, 1),
            (3, 1, 1, 1, 1, 1, 1, 1)],
    "datatype": [0, 1, 32, 128, 256, 1792, 2304, 9999, -1, 32767],
    "bitpix": [0, -1, 7, 32767],
    # on one axis where it is invalid, on all three where it is valid but costly (one 300 mm axis alone is 4800 x 16
    # x 16 at the model's grid: inside the memory budget, bounded by serve.timeout_s, too slow for this test)
    "pixdim": [(1.0, s, 1.0, 1.0, 1, 1, 1, 1) for s in (0.0, -1.0, math.nan, math.inf, 1e-6)]
    + [(1.0, s, s, s, 1, 1, 1, 1) for s in (300.0, 3.4e38)],
    "vox_offset": [0.0, -1.0, math.nan, math.inf, 1e10, 347.0, 349.0, 3.4e38, 16384.0],
    "scl_slope": [math.nan, math.inf, -math.inf, 0.0, 3e38, -3e38, 1e-38],
    "scl_inter": [math.nan, math.inf, 3e38],
    "xyzt_units": [0, 255],
    "qform_code": [-1, 32767],
    "sform_code": [-1, 32767, 0],
    "quatern": [(math.nan,) * 6, (math.inf,) * 6, (2.0, 2.0, 2.0, 0.0, 0.0, 0.0)],
    "srow_x": [(math.nan,) * 4, (0.0,) * 4, (3e38,) * 4],
    "magic": [b"n+2\0", b"ni1\0", b"\0\0\0\0"],
}  # fmt: skip


def mutations() -> Iterator[tuple[str, bytes]]:
    for field, values in BOUNDARY.items():
        for i, value in enumerate(values):
            yield f"{field}-{i}", volume(**{field: value})


def test_mutated_headers_never_5xx(server: Server, good_case: bytes) -> None:
    codes: dict[int, int] = {}
    for label, body in mutations():
        for name, payload in ((f"{label}.nii", body), (f"{label}.nii.gz", gzip.compress(body, 1))):
            resp = post(server, name, payload)
            assert resp.status_code < 500, (name, resp.status_code, resp.text)
            if resp.status_code >= 400:
                assert name in resp.json()["detail"], resp.text
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
    assert set(codes) - {200, 400, 413, 422} == set(), codes
    assert codes.get(400) and codes.get(422) and codes.get(200)  # the generator reaches every outcome
    assert_survives(server, good_case)


def test_mutated_headers_in_cli_folder(trained_synth: TrainedModel, good_case: bytes, tmp_path: Path) -> None:
    """`mlops predict folder/`: each hostile file reported and skipped, the good one (sorted last) written, exit 1."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for label, body in mutations():
        (inputs / f"{label}.nii").write_bytes(body)
    (inputs / "zzz_good.nii.gz").write_bytes(good_case)
    args = ["predict", str(inputs), "-o", str(tmp_path / "out"), f"predict.model_dir={trained_synth.model_dir}"]
    proc = run_mlops(*args, "predict.tta=false", env=trained_synth.workspace.env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "could not be segmented" in proc.stderr and "dim-2.nii" in proc.stderr
    assert (tmp_path / "out" / "zzz_good.nii.gz").is_file()
    assert not list((tmp_path / "out").glob(".*"))  # no half-written files


# ----------------------------------------------------------------------------------------- API fuzzing
def test_schemathesis_fuzz_no_5xx(server: Server, good_case: bytes) -> None:
    """schemathesis generates requests from the service's own OpenAPI schema (bounded, derandomised)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    seen: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            resp = case.call(base_url=server.url, timeout=60)
            seen.append(resp.status_code)
            assert resp.status_code < 500, (case.method, case.path, resp.status_code, resp.text[:500])

        check()
    assert len(seen) >= 25 and any(400 <= c < 500 for c in seen)
    assert_survives(server, good_case)
