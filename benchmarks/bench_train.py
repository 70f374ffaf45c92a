"""Training throughput of `mlops train` against nnU-Net's own `nnUNetv2_train`, same data, same iterations.

Both train fold 0 of the same preprocessed dataset with the same configuration on the same device. nnUNetv2_train can
only run nnU-Net's fixed schedule (250 train + 50 validation iterations per epoch: any other trainer name makes nnU-Net
import timm/torchvision, which fail here), so both runs use that epoch and are stopped after ``--epochs`` epochs.
Epoch times come from nnU-Net's own training log in both cases ("Epoch time: X s"), so the wrapper is measured by the
same clock as the original. Peak memory is the largest resident set of the whole process tree (workers included).

    python benchmarks/bench_train.py                # synthetic task, prepared on the fly, CPU
    python benchmarks/bench_train.py --epochs 2 --device cuda

Target: ratio (mlops iterations/s over nnUNetv2_train iterations/s) >= 0.98.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
EPOCH_RE = re.compile(r"Epoch time: ([\d.]+) s")


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a worker may exit between listing and reading
            total += p.memory_info().rss
    return total


def run_until_epochs(cmd: list[str], env: dict[str, str], log_dir: Path, epochs: int) -> tuple[list[float], int]:
    """Run ``cmd`` until nnU-Net's log in ``log_dir`` shows ``epochs`` epoch times; return them and the peak RSS."""
    popen = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    proc, peak, times = psutil.Process(popen.pid), 0, []
    try:
        while popen.poll() is None:
            peak = max(peak, tree_rss(proc))
            logs = sorted(log_dir.glob("training_log_*.txt")) if log_dir.is_dir() else []
            times = [float(t) for t in EPOCH_RE.findall(logs[-1].read_text())] if logs else []
            if len(times) >= epochs:
                break
            time.sleep(0.2)
        if len(times) < epochs:
            raise SystemExit(f"{' '.join(cmd)} ended early ({popen.returncode}):\n{popen.stderr.read()[-3000:]}")
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGTERM)
            popen.wait(timeout=60)
    return times[:epochs], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="epochs to time for each (250+50 iterations each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", type=Path, help="an MLOPS_DATA_DIR with Dataset500_Synthetic prepared")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir or Path(tmp) / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
        env.update(MLOPS_DATA_DIR=str(data), nnUNet_n_proc_DA="2", WANDB_MODE="disabled")
        if args.data_dir is None:
            task = Path(tmp) / "Task500_Synthetic"
            subprocess.run([str(BIN / "mlops"), "synth", str(task)], env=env, check=True, capture_output=True)
            subprocess.run([str(BIN / "mlops"), "prepare", str(task)], env=env, check=True, capture_output=True)
        fold_dir = data / "nnUNet_results/Dataset500_Synthetic/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0"

        ours_cmd = [str(BIN / "mlops"), "train", "--fold", "0", "--device", args.device, "dataset.id=500"]
        ours_cmd += ["train.num_workers=2", "wandb.mode=disabled", "train.validate=false"]
        ours, ours_peak = run_until_epochs(ours_cmd, env, fold_dir, args.epochs)

        nn_env = dict(env)
        nn_env.update({v: str(data / v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
        theirs_cmd = [str(BIN / "nnUNetv2_train"), "500", "3d_fullres", "0", "-device", args.device]
        for old in fold_dir.glob("training_log_*.txt"):
            old.unlink()
        theirs, theirs_peak = run_until_epochs(theirs_cmd, nn_env, fold_dir, args.epochs)

    iters = 250 + 50
    ours_ips, theirs_ips = iters * len(ours) / sum(ours), iters * len(theirs) / sum(theirs)
    lines = [
        f"device {args.device}, {args.epochs} epoch(s) of 250 train + 50 val iterations each, synthetic 3d_fullres",
        f"{'':<22}{'mlops train':>14}{'nnUNetv2_train':>16}",
        f"{'epoch times (s)':<22}{', '.join(f'{t:.1f}' for t in ours):>14}{', '.join(f'{t:.1f}' for t in theirs):>16}",
        f"{'iterations / s':<22}{ours_ips:>14.3f}{theirs_ips:>16.3f}",
        f"{'peak RSS (MiB)':<22}{ours_peak / 2**20:>14.0f}{theirs_peak / 2**20:>16.0f}",
        f"ratio (mlops / nnUNetv2_train iterations/s): {ours_ips / theirs_ips:.3f}  (target >= 0.98)",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
