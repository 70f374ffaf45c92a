"""Time `mlops prepare` against nnU-Net's own `nnUNetv2_convert_MSD_dataset` + `nnUNetv2_plan_and_preprocess`.

Both run on the same Decathlon folder (default: ../shared/data/Task04_Hippocampus) with the same worker count and the
3d_fullres configuration, each into its own empty nnU-Net folders. Prints conversion and preprocessing times
separately, the totals, their ratio, and the time of an up-to-date re-run.

    python benchmarks/bench_prepare.py [TASK_FOLDER] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loguru import logger

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout + proc.stderr


def nnunet_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir(parents=True)
        env[var] = str(root / var)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", nargs="?", default=str(REPO.parent / "shared/data/Task04_Hippocampus"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    task = Path(args.task).resolve()
    if not (task / "dataset.json").is_file():
        raise SystemExit(f"{task}: not a Decathlon task folder")
    m = re.match(r"Task(\d+)_", task.name)
    task_id = int(m.group(1)) if m else 4
    n = str(args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "mlops", Path(tmp) / "nnunet"
        env = nnunet_env(ours)
        total_ours, log = run([str(BIN / "mlops"), "prepare", str(task), "-j", n], env)
        conv = float(re.search(r"conversion\s*│\s*([\d.]+) s", log).group(1))
        pre = float(re.search(r"3d_fullres in ([\d.]+) s", log).group(1))
        rerun, _ = run([str(BIN / "mlops"), "prepare", str(task)], env)

        env = nnunet_env(theirs)
        conv_nn, _ = run([str(BIN / "nnUNetv2_convert_MSD_dataset"), "-i", str(task), "-np", n], env)
        pre_nn, _ = run(
            [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(task_id), "-c", "3d_fullres", "-np", n], env
        )
        shutil.rmtree(ours, ignore_errors=True)
    rows = [
        ("conversion (validate + convert)", conv, conv_nn),
        ("fingerprint + plan + preprocess", pre, pre_nn),
        ("total wall time (incl. start-up)", total_ours, conv_nn + pre_nn),
    ]
    logger.info(f"Task: {task} ({args.workers} workers)")
    lines = [f"{'step':<34}{'mlops prepare':>15}{'nnU-Net scripts':>17}{'ratio':>8}"]
    lines += [f"{name:<34}{a:>13.1f} s{b:>15.1f} s{b / a:>8.2f}" for name, a, b in rows]
    lines.append(f"{'up-to-date re-run':<34}{rerun:>13.2f} s{'(redoes all)':>17}")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
