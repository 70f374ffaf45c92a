"""Usage errors and interrupted commands: a typed configuration (exit 2 naming the key and the allowed values), and
SIGTERM/odd destinations/half-prepared data giving one clear message and leaving nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .conftest import Workspace, run_mlops

WRONG = [
    (["prepare", "dataset.id=abc"], "dataset.id", "valid integer"),
    (["train", "train.epochs=abc"], "train.epochs", "valid integer"),
    (["serve", "serve.max_in_flight=abc"], "serve.max_in_flight", "valid integer"),
    (["prepare", "prepare.configurations=[3d_bogus]", "--force"], "prepare.configurations", "'3d_fullres'"),
    (["train", "train.configuration=3d_bogus"], "train.configuration", "'2d', '3d_fullres'"),
    (["train", "--device", "gpu"], "train.device", "'auto', 'cuda', 'cpu' or 'mps'"),
    (["predict", "x.nii.gz", "--folds", "abc"], "predict.folds", "0-4 or 'all'"),
    (["drift", "drift.current=live"], "drift.current", "'test' or 'requests'"),
]


@pytest.mark.parametrize(("args", "key", "allowed"), WRONG, ids=[w[1] for w in WRONG])
def test_wrong_type_or_name_is_usage_error(workspace: Workspace, args: list[str], key: str, allowed: str) -> None:
    proc = run_mlops(*args, env=workspace.env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Usage error" in proc.stderr and key in proc.stderr and allowed in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_schema_accepts_the_shipped_configs_and_new_keys() -> None:
    from mlops.config import load_config
    from mlops.errors import ConfigError

    for overrides in ([], ["dataset=synthetic", "train=quick"], ["predict.folds=[0,all]", "predict.folds=null"]):
        load_config(overrides)
    cfg = load_config(["predict.precision=bf16", "predict.backend=onnxruntime", "+predict.new_knob=3"])
    assert (cfg.predict.precision, cfg.predict.backend, cfg.predict.new_knob) == ("bf16", "onnxruntime", 3)
    for bad, key in (("predict.precision=fp8", "precision"), ("predict.backend=tensorrt", "backend"),
                     ("predict.max_batch=0", "max_batch")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"predict\.{key}"):
            load_config([bad])


# ------------------------------------------------------------------------------------------ SIGTERM
def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "mlops"
    return subprocess.Popen([str(exe), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class _Slow(BaseHTTPRequestHandler):
    """An archive server that sends a little, then stalls: the download is mid-way when SIGTERM arrives."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10_000_000))
        self.end_headers()
        self.wfile.write(b"\0" * 3_000_000)
        self.wfile.flush()
        time.sleep(20)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/Task04_Hippocampus.tar"
    finally:
        httpd.shutdown()


def test_download_sigterm_removes_part(workspace: Workspace, slow_server: str, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "Task04_Hippocampus.tar"
    args = ["download", "--url", slow_server, "--dest", str(dest), "download.chunk_bytes=65536"]
    proc = _start(args, workspace.env())
    part = dest.with_name(dest.name + ".part")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (part.is_file() and part.stat().st_size > 0):
        time.sleep(0.2)
    assert part.is_file(), proc.communicate(timeout=30)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert not part.exists() and not dest.exists()
    assert "Traceback" not in stderr


def test_download_destination_under_a_file(workspace: Workspace, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    dest = tmp_path / "afile" / "Task04_Hippocampus.tar"
    proc = run_mlops("download", "--url", "http://127.0.0.1:9/x.tar", "--dest", str(dest), env=workspace.env())
    assert proc.returncode == 1, proc.stderr
    assert "cannot create its folder" in proc.stderr and "Traceback" not in proc.stderr


def test_prepare_sigterm_leaves_no_staging(workspace: Workspace, synth_task: Path) -> None:
    proc = _start(["prepare", str(synth_task), "prepare.num_workers=1"], workspace.env())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(workspace.raw.glob(".Dataset500_Synthetic.staging-*")):
        time.sleep(0.05)
    assert list(workspace.raw.glob(".Dataset500_Synthetic.staging-*")), "conversion did not start"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert not list(workspace.raw.glob(".*staging-*"))
    assert "Traceback" not in stderr


def test_train_on_half_prepared_dataset_says_run_prepare(prepared_synth: Workspace, tmp_path: Path) -> None:
    """An interrupted `mlops prepare` (stamp gone, some preprocessed cases missing): not nnU-Net's riddle."""
    import shutil

    ws = Workspace(tmp_path / "data")
    shutil.copytree(prepared_synth.preprocessed / "Dataset500_Synthetic", ws.preprocessed / "Dataset500_Synthetic")
    pre = ws.preprocessed / "Dataset500_Synthetic"
    (pre / "mlops_preprocess.json").unlink()
    for f in sorted((pre / "nnUNetPlans_3d_fullres").glob("synth_00[4-7]*")):
        f.unlink()
    proc = run_mlops("train", "--fold", "0", "dataset.id=500", "wandb.mode=disabled", env=ws.env())
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "not fully preprocessed" in proc.stderr and "run `mlops prepare` first" in proc.stderr
    assert "Unable to infer" not in proc.stderr and "Traceback" not in proc.stderr
