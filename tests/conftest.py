"""Shared fixtures: isolated nnU-Net folders, synthetic tasks, the real shared data, and a CLI runner."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from mlops.synth import SynthSpec, generate_task

from . import models

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HIPPOCAMPUS = SHARED / "Task04_Hippocampus"
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@dataclass
class Workspace:
    """A data root with nnU-Net's three folders, as `mlops` lays them out under ``MLOPS_DATA_DIR``."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    def env(self) -> dict[str, str]:
        """Environment for a subprocess `mlops` using this workspace."""
        env = {k: v for k, v in os.environ.items() if k not in NNUNET_VARS}
        env["MLOPS_DATA_DIR"] = str(self.root)
        return env

    def nnunet_env(self) -> dict[str, str]:
        """Environment for nnU-Net's own tools on this workspace."""
        env = self.env()
        env.update(
            nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed), nnUNet_results=str(self.results)
        )
        return env


@pytest.fixture(autouse=True)
def _isolate_nnunet_env() -> Iterator[None]:
    """In-process CLI runs export nnU-Net's variables (as a real `mlops` process must); undo that after each test.

    monkeypatch.delenv of an absent variable records nothing to restore, so a snapshot is taken here instead.
    """
    names = (*NNUNET_VARS, "nnUNet_n_proc_DA", "nnUNet_def_n_proc", "nnUNet_wandb_enabled")
    saved = {k: os.environ.get(k) for k in names}
    for k in NNUNET_VARS:
        os.environ.pop(k, None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """An empty data root; nnU-Net's own variables are cleared so the config's defaults under it apply."""
    for var in NNUNET_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLOPS_DATA_DIR", str(tmp_path / "data"))
    return Workspace(tmp_path / "data")


@pytest.fixture(scope="session")
def synth_task() -> Iterator[Path]:
    """A pristine 3D synthetic Decathlon task (8 training, 2 test cases), cached (tests/models.py). Read-only: copy
    it before modifying it (``task_copy``); the session fails if a test wrote into it."""
    task = models.synthetic_task()
    yield task
    models.Entry(task.parent.parent, "", 0.0, built_now=False).verify()


@pytest.fixture(scope="session")
def synth_task_4d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-channel (4D) synthetic Decathlon task, like BrainTumour or Prostate."""
    spec = SynthSpec(num_train=4, num_test=1, channels=2, seed=3)
    return generate_task(tmp_path_factory.mktemp("synth4d") / "Task501_TwoChannel", spec)


@pytest.fixture
def task_copy(synth_task: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic task that a test may break."""
    dst = tmp_path / "src" / synth_task.name
    shutil.copytree(synth_task, dst)
    return dst


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    """monkeypatch for module-scoped fixtures (an in-process server's environment)."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


def system_tool(name: str, package: str, path: str = "") -> str:
    """A Debian tool `make test` installs (system-deps); a test never installs anything. Missing, its tests skip with
    the reason, or fail under CI=true, where skipping would hide them."""
    exe = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{path}" if path else None)
    if exe is None:
        message = f"Debian's {package} is not installed: `make system-deps` (root) or `apt-get install {package}`"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (headless, for the page tests)."""
    return shutil.which("chromium-browser") or system_tool("chromium", "chromium")


@dataclass
class Orthanc:
    """A real Orthanc PACS with its DICOMweb plugin, on 127.0.0.1, for this session."""

    port: int
    user: str
    password: str
    folder: Path

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def env(self) -> dict[str, str]:
        return {"MLOPS_DICOMWEB_USER": self.user, "MLOPS_DICOMWEB_PASSWORD": self.password}


ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Debian's Orthanc started with a private database, HTTP on a free port answering only local clients (Orthanc
    cannot bind one interface: RemoteAccessAllowed=false refuses every other), the DICOM port off, basic auth on."""
    exe = system_tool("Orthanc", "orthanc", "/usr/sbin")
    if not ORTHANC_PLUGIN.is_file():
        system_tool("no-such-orthanc-dicomweb", "orthanc-dicomweb")
    folder = tmp_path_factory.mktemp("orthanc")
    server = Orthanc(free_port(), "mlops", "test-" + os.urandom(6).hex(), folder)
    config = {
        "Name": "mlops-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": server.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True, "RegisteredUsers": {server.user: server.password},
        "Plugins": [str(ORTHANC_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpThreadsCount": 4, "StableAge": 2, "ConcurrentJobs": 1,
    }  # fmt: skip
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = folder / "orthanc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, str(folder / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"Orthanc exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"Orthanc did not answer in 60 s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{server.dicomweb}/studies", auth=(server.user, server.password), timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


RAY_CPUS = 2


@dataclass(frozen=True)
class RayHead:
    address: str  # the GCS, 127.0.0.1:PORT
    token: str  # the head's own token (Ray's token auth), not the user's ~/.ray/auth_token

    @property
    def env(self) -> dict[str, str]:
        """What a driver joining this head needs in its environment."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """One local Ray for the session's `mlops batch` runs, which join it with ``--address`` as drivers join a real
    cluster (a Ray start per run cost seconds each). A head process of its own (``ray start --head --block``) with
    a private token and temp folder: ``ray.init()`` elsewhere on the machine does not pick it up (``auto`` would: an
    address is always given here). Ray's services listen on every interface whatever the node address (Ray's design;
    the local Ray each run started before did too): the token refuses other clients. Stopped at the end with every
    process it started."""
    exe = Path(sys.executable).parent / "ray"
    temp = Path(tempfile.mkdtemp(prefix="mlops-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    head = RayHead(f"127.0.0.1:{free_port()}", os.urandom(16).hex())
    log = temp / "head.log"
    cmd = [
        str(exe), "start", "--head", "--block", f"--port={head.address.rpartition(':')[2]}",
        "--node-ip-address=127.0.0.1", f"--num-cpus={RAY_CPUS}", "--num-gpus=0", "--include-dashboard=false",
        "--disable-usage-stats", f"--temp-dir={temp}", f"--object-store-memory={512 * 2**20}",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **head.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while not (temp / "ray_current_cluster").is_file():  # written once the head's processes are up
            assert proc.poll() is None, f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the Ray head did not start in 120 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield head
    finally:
        stop_group(proc, grace_s=5)  # Ray's head catches SIGTERM and lingers: what is left then is killed
        for pid in pids(containing=str(temp)):  # anything that left the group
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a process started in a session of its own and its whole group; SIGKILL what is left after
    ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    proc.wait(timeout=10)


def pids(*, starting: str = "", containing: str = "") -> list[int]:
    """Processes (not this one) whose command line starts with ``starting`` and contains ``containing``; Ray names its
    workers ``ray::<what they run>``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith(starting) and containing in cmdline:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="session")
def hippocampus() -> Path:
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"real data absent: {HIPPOCAMPUS} (see ../shared/data/README.md)")
    return HIPPOCAMPUS


def wait_ready(proc: subprocess.Popen, url: str, log: Path, seconds: float = 120) -> httpx.Response:
    """Poll ``url``/ready until 200 (bounded); fail with the server's log if it exits or never gets ready."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            ready = httpx.get(f"{url}/ready", timeout=2)
            if ready.status_code == 200:
                return ready
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server did not become ready in {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_process(overrides: list[str], tmpdir: Path) -> Iterator[str]:
    """The service `mlops serve` runs (create_app + the same configured uvicorn server), on 127.0.0.1 in a thread of
    this process: no process start or torch import per server. For what a process boundary is the point of (signals,
    memory, the container's command, the browser's page), tests start `mlops serve` itself. ``tmpdir`` stands in for
    the process's TMPDIR while the server runs (tests check that uploads leave no files behind)."""
    from mlops.api import create_app
    from mlops.config import load_config
    from mlops.service.server import build_server

    port = free_port()
    cfg = load_config([*overrides, "serve.host=127.0.0.1", f"serve.port={port}"])
    server = build_server(create_app(cfg), cfg)
    saved, tempfile.tempdir = tempfile.tempdir, str(tmpdir)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive(), "the in-process server stopped while starting (see the log above)"
            assert time.monotonic() < deadline, "the in-process server did not start in 120 s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        tempfile.tempdir = saved
        assert not thread.is_alive(), "the in-process server did not stop within 60 s"


@contextmanager
def mlops_process(*args: str, env: dict[str, str], **popen: Any) -> Iterator[subprocess.Popen]:
    """The `mlops` console script started in the background (text pipes unless ``popen`` says otherwise); killed on
    the way out if it still runs, so a failed assertion never leaves a long training run behind."""
    exe = Path(sys.executable).parent / "mlops"
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    proc = subprocess.Popen([str(exe), *args], env=env, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def run_mlops(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `mlops` console script as a user would (a real process, real exit code)."""
    exe = Path(sys.executable).parent / "mlops"
    return subprocess.run([str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="session")
def synth_entry(synth_task: Path) -> Iterator[models.Entry]:
    """The synthetic task prepared by the real `mlops prepare` and fold 0 trained by the real `mlops train` on CPU,
    cached by content hash (tests/models.py): built by the first run on a machine, reused by later ones."""
    entry = models.synthetic(synth_task)
    yield entry
    entry.verify()


@pytest.fixture(scope="session")
def prepared_synth(synth_entry: models.Entry) -> Workspace:
    """The prepared synthetic task (read-only: a test that trains or writes copies it with ``private_synth``)."""
    return Workspace(synth_entry.root)


@pytest.fixture
def private_synth(prepared_synth: Workspace, tmp_path: Path) -> Workspace:
    """A writable copy of the prepared synthetic task with empty results: for tests that train folds of their own."""
    return Workspace(models.private_copy(prepared_synth.root, tmp_path / "data"))


QUICK_TRAIN = models.QUICK_TRAIN


@dataclass
class TrainedModel:
    workspace: Workspace
    stdout: str
    dataset: str = "Dataset500_Synthetic"

    @property
    def model_dir(self) -> Path:
        return self.workspace.results / self.dataset / "nnUNetTrainer__nnUNetPlans__3d_fullres"

    @property
    def fold_dir(self) -> Path:
        return self.model_dir / "fold_0"


@pytest.fixture(scope="session")
def trained_synth(synth_entry: models.Entry) -> TrainedModel:
    """Fold 0 of the synthetic task trained by the real `mlops train` (QUICK_TRAIN; read-only, cached)."""
    return TrainedModel(Workspace(synth_entry.root), synth_entry.stdout)


@pytest.fixture(scope="session")
def trained_real(hippocampus: Path) -> Iterator[TrainedModel]:
    """Fold 0 of the real Task04, prepared and trained with models.REAL_TRAIN (a schedule that learns both labels),
    cached outside the clone by content hash: about 50 CPU minutes once per machine, then seconds. Every test that
    uses it is in the slow tier (pytest_collection_modifyitems)."""
    entry = models.real(hippocampus)
    yield TrainedModel(Workspace(entry.root), entry.stdout, "Dataset004_Hippocampus")
    entry.verify()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs the real trained model is slow (and needs the real data), whatever its own marks say."""
    for item in items:
        if "trained_real" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.real_data)
