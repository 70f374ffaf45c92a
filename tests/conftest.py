"""Shared fixtures: isolated nnU-Net folders, synthetic tasks, the real shared data, and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from mlops.synth import SynthSpec, generate_task

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
def synth_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine 3D synthetic Decathlon task (8 training, 2 test cases). Copy it before modifying it."""
    return generate_task(tmp_path_factory.mktemp("synth") / "Task500_Synthetic", SynthSpec(num_train=8, num_test=2))


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


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


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


def run_mlops(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the installed `mlops` console script as a user would (a real process, real exit code)."""
    exe = Path(sys.executable).parent / "mlops"
    return subprocess.run([str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="session")
def prepared_synth(tmp_path_factory: pytest.TempPathFactory, synth_task: Path) -> Iterator[Workspace]:
    """The synthetic task prepared once for the session by the real `mlops prepare` (nnU-Net planning included)."""
    ws = Workspace(tmp_path_factory.mktemp("prepared") / "data")
    proc = run_mlops("prepare", str(synth_task), env=ws.env())
    assert proc.returncode == 0, proc.stderr
    yield ws


# A short CPU schedule through nnU-Net's real trainer: enough to learn the synthetic structures measurably.
QUICK_TRAIN = [
    "dataset.id=500",
    "train=quick",
    "train.epochs=4",
    "train.iterations_per_epoch=10",
    "train.val_iterations_per_epoch=3",
    "train.device=cpu",
]


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
def trained_synth(prepared_synth: Workspace, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """Fold 0 of the synthetic task trained once for the session by the real `mlops train` on CPU."""
    reports = tmp_path_factory.mktemp("reports")
    proc = run_mlops("train", "--fold", "0", *QUICK_TRAIN, f"paths.reports={reports}", env=prepared_synth.env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return TrainedModel(prepared_synth, proc.stdout)


# 6 epochs x 25 iterations at batch 2 reached Dice 0.52 (posterior) on the 34 validation cases, 0 (anterior: nnU-Net
# learns it later); chance is 0.028. 8 epochs leave a margin for the non-deterministic data augmentation. Measured
# here on 2 CPU cores (this schedule, alone): prepare 37 s, training 13.4 min (about 4 s per iteration), nnU-Net's
# validation 2.6 min; Dice posterior 0.55, anterior 0. No monitoring profile: no test reads this model's, and its
# 10 predicted validation cases cost 47 s (the profile written by training is tested on the synthetic model).
REAL_TRAIN = ["train=quick", "train.epochs=8", "train.iterations_per_epoch=25", "train.val_iterations_per_epoch=2",
              "train.batch_size=2", "train.device=cpu", "wandb.mode=disabled",
              "monitor.profile_on_train=false"]  # fmt: skip


@pytest.fixture(scope="session")
def trained_real(hippocampus: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """Fold 0 of the real Task04 trained once for the session (a few CPU minutes): prepare, then `mlops train`."""
    ws = Workspace(tmp_path_factory.mktemp("real") / "data")
    proc = run_mlops("prepare", str(hippocampus), env=ws.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_mlops("train", "--fold", "0", "dataset.id=4", *REAL_TRAIN, env=ws.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return TrainedModel(ws, proc.stdout, "Dataset004_Hippocampus")
