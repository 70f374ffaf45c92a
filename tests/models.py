"""Test models and prepared datasets: built once by the real `mlops prepare` + `mlops train`, cached outside the clone.

A cached entry is a whole data root (nnU-Net's raw, preprocessed and results folders) under
``$MLOPS_TEST_CACHE`` (default ``~/.cache/mlops-tests``), named by a SHA-256 of everything that decides its content:
the source task's files, the schedule, the nnunetv2 and torch versions and our own preparation and training code.
Change any of them and the next run builds a new entry; nothing else ever invalidates one. Builds run under a file
lock (pytest-xdist workers and concurrent runs build once) in the entry's own folder (prepare and train record their
paths), and ``entry.json`` is written last: an interrupted build is removed and redone by the next run.

Entries are read-only by contract: tests that train more folds copy the prepared dataset first (``private_copy``).
``Entry.verify`` checks at the end of a session that no test wrote into an entry (a root user's chmod would not stop
it); a polluted entry is removed and the test run fails, naming what changed.

Build ahead of a run (CI does, before the slow tier):  ``python -m tests.models real``  (or ``synthetic``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "mlops"
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
MODEL_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"

# Our code that decides a prepared dataset and a trained fold, besides the data, the schedule and nnU-Net itself:
# conversion, preparation, the workspace (which dataset, whether it is fully preprocessed), the training workflow and
# the nnU-Net boundary (not the other I/O helpers, W&B or inference).
TRAIN_CODE = ("decathlon.py", "prepare.py", "train.py", "nnunet.py", "workspace.py")

# A short CPU schedule through nnU-Net's real trainer: enough to learn the synthetic structures measurably
# (4 epochs x 10 iterations: Dice ~0.89 anterior, ~0.58 posterior; about a minute on 2 cores).
QUICK_TRAIN = [
    "dataset.id=500",
    "train=quick",
    "train.epochs=4",
    "train.iterations_per_epoch=10",
    "train.val_iterations_per_epoch=3",
    "train.device=cpu",
]

# The real Task04 model: train=cpu's batch (6) and iterations (50), 8 of its 12 epochs. train=cpu's own run passed
# pseudo Dice 0.8 at epoch 7 (2,400 samples), so 8 epochs with the learning rate decayed over 8 learn both labels;
# about 50 minutes on 2 cores, paid once per machine (the cache). No monitoring profile (tests build their own on
# a copy) and no W&B run.
REAL_TRAIN = ["dataset.id=4", "train=cpu", "train.epochs=8", "train.device=cpu", "wandb.mode=disabled",
              "monitor.profile_on_train=false"]  # fmt: skip


def cache_root() -> Path:
    return Path(os.environ.get("MLOPS_TEST_CACHE") or Path.home() / ".cache" / "mlops-tests")


def _digest_tree(h: hashlib._Hash, root: Path) -> None:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())


def cache_key(kind: str, source: Path, schedule: list[str], code: tuple[str, ...]) -> str:
    """16 hex of SHA-256 over the source task, the schedule, the versions that train and our code that prepares."""
    h = hashlib.sha256(f"{kind}\0{' '.join(schedule)}\0".encode())
    for package in ("nnunetv2", "torch", "dynamic_network_architectures", "batchgeneratorsv2"):
        h.update(f"{package}=={version(package)}\0".encode())
    for name in code:
        h.update(name.encode() + b"\0" + (SRC / name).read_bytes())
    _digest_tree(h, source)
    return h.hexdigest()[:16]


def mlops_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NNUNET_VARS}
    env["MLOPS_DATA_DIR"] = str(root)
    return env


def run_mlops(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "mlops"
    return subprocess.run([str(exe), *args], env=env, cwd=cwd, capture_output=True, text=True, check=False)


def _listing(root: Path) -> dict[str, list[int]]:
    return {str(p.relative_to(root)): [p.stat().st_size, p.stat().st_mtime_ns] for p in root.rglob("*") if p.is_file()}


@dataclass
class Entry:
    """One finished cache entry: its data root, the training output and how long it took to build."""

    path: Path
    stdout: str
    built_s: float
    built_now: bool

    @property
    def root(self) -> Path:
        return self.path / "data"

    def verify(self) -> None:
        """Raise if a test wrote into the entry (every later run shares it); the next run then builds it anew.

        The entry is not deleted here: another run may be reading it. Its entry.json is renamed, and the changed
        files are written to ``polluted.txt`` beside it."""
        recorded = json.loads((self.path / "listing.json").read_text())
        now = _listing(self.root)
        if now != recorded:
            changed = sorted(set(now) ^ set(recorded) | {k for k in now.keys() & recorded if now[k] != recorded[k]})
            (self.path / "polluted.txt").write_text("\n".join(changed))
            if (self.path / "entry.json").is_file():  # another run may have found it first
                (self.path / "entry.json").replace(self.path / "entry.polluted.json")
            raise AssertionError(f"a test wrote into the cached test data {self.path}: {changed[:10]}")


def build(kind: str, source: Path, steps: list[list[str]], code: tuple[str, ...]) -> Entry:
    """The cached entry for ``kind``, built by running ``steps`` (mlops commands) on a fresh data root if absent."""
    schedule = [("SOURCE" if arg == str(source) else arg) for step in steps for arg in step]  # not where it lies
    key = cache_key(kind, source, schedule, code)
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{kind}-{key}"
    with FileLock(str(cache / f"{kind}-{key}.lock")):
        if (final / "entry.json").is_file():
            meta = json.loads((final / "entry.json").read_text())
            return Entry(final, (final / "stdout.txt").read_text(), meta["built_s"], built_now=False)
        shutil.rmtree(final, ignore_errors=True)  # an interrupted build: entry.json is written last
        (final / "data").mkdir(parents=True)
        start, out = time.monotonic(), []
        for step in steps:  # in place: prepare and train record their data root's paths (tests read them)
            proc = run_mlops(*step, env=mlops_env(final / "data"), cwd=final)  # reports/ lands in the entry
            if proc.returncode != 0:
                tail = proc.stderr[-4000:]
                raise RuntimeError(f"building cached {kind} data: mlops {' '.join(step)} failed:\n{tail}")
            out.append(proc.stdout)
        built_s = round(time.monotonic() - start, 1)
        (final / "stdout.txt").write_text("".join(out))
        (final / "listing.json").write_text(json.dumps(_listing(final / "data")))
        meta = {"kind": kind, "key": key, "source": str(source), "steps": steps, "built_s": built_s}
        (final / "entry.json").write_text(json.dumps(meta, indent=1))
        return Entry(final, "".join(out), built_s, built_now=True)


def synthetic_task() -> Path:
    """The pristine synthetic task (8 training, 2 test cases), generated once into the cache: its files keep their
    path and times across runs, so `mlops prepare` of it finds the cached preparation up to date. Read-only."""
    from mlops.synth import SynthSpec, generate_task

    spec = SynthSpec(num_train=8, num_test=2)
    key = hashlib.sha256(f"{spec!r}\0".encode() + (SRC / "synth.py").read_bytes()).hexdigest()[:16]
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / f"synthetic-task-{key}"
    with FileLock(str(cache / f"synthetic-task-{key}.lock")):
        if not (folder / "entry.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            generate_task(folder / "data" / "Task500_Synthetic", spec)
            (folder / "listing.json").write_text(json.dumps(_listing(folder / "data")))
            (folder / "entry.json").write_text(json.dumps({"kind": "synthetic-task", "spec": repr(spec)}))
    return folder / "data" / "Task500_Synthetic"


def synthetic(source: Path) -> Entry:
    """The synthetic task prepared and fold 0 trained with QUICK_TRAIN."""
    steps = [["prepare", str(source)], ["train", "--fold", "0", *QUICK_TRAIN]]
    return build("synthetic", source, steps, TRAIN_CODE)


def real(source: Path = HIPPOCAMPUS) -> Entry:
    """Task04 prepared and fold 0 trained with REAL_TRAIN."""
    return build("real", source, [["prepare", str(source)], ["train", "--fold", "0", *REAL_TRAIN]], TRAIN_CODE)


def private_copy(root: Path, dest: Path, results: bool = False) -> Path:
    """A writable copy of a cached data root's raw and preprocessed folders (and results, if asked) under ``dest``."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", *(("nnUNet_results",) if results else ())):
        shutil.copytree(root / name, dest / name, symlinks=True)
    (dest / "nnUNet_results").mkdir(exist_ok=True)
    return dest


if __name__ == "__main__":  # python -m tests.models real|synthetic
    from loguru import logger

    what = sys.argv[1] if len(sys.argv) > 1 else "real"
    entry = real() if what == "real" else synthetic(synthetic_task())
    logger.info(f"{what}: {entry.path} ({'built in' if entry.built_now else 'cached, built in'} {entry.built_s} s)")
