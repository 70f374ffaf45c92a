"""Cohort throughput: `mlops batch` (Ray Data, 1 and 2 actors) vs `mlops predict` and `nnUNetv2_predict` on a folder.

The same model, cases and mirroring for every row; each row is a whole command from start to exit (what a user
waits for), with its cases/s and the peak summed RSS of its process tree (Ray's workers and nnU-Net's included).
Ray's own start-up and the pipeline's time are printed separately from `mlops batch --json`.

    python benchmarks/bench_batch.py [--model MODEL_DIR] [--cases N] [--no-tta]
Cases: the 200 real Task04 scans (imagesTr + imagesTs of ../shared/data) when present, else the synthetic task's.
Without --model, the real task is prepared and a model trained for a few iterations: its weights are poor, but the
network, plans and patch size are the real task's, so every row does the real amount of work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_predict import BIN, SHARED, as_nnunet_inputs, nnunet_cmd, timed_tree

TASK = SHARED / "Task04_Hippocampus"


def quick_model(tmp: Path, env: dict[str, str]) -> Path:
    """Prepare the real task and train fold 0 for a few iterations (the real network; speed, not accuracy)."""
    if not (TASK / "dataset.json").is_file():
        from bench_serve import make_model

        return make_model(tmp, env)
    steps = [
        ["prepare", str(TASK)],
        ["train", "--fold", "0", "dataset.id=4", "train=quick", "train.epochs=1", "train.iterations_per_epoch=2",
         "train.val_iterations_per_epoch=1", "train.batch_size=2", "train.device=cpu", "train.validate=false",
         "wandb.mode=disabled"],
    ]  # fmt: skip
    for step in steps:
        done = subprocess.run([str(BIN / "mlops"), *step], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"mlops {step[0]} failed:\n{done.stderr[-3000:]}")
    return Path(env["MLOPS_DATA_DIR"]) / "nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--cases", type=int, default=0, help="use only the first N cases (default: all)")
    parser.add_argument("--no-tta", action="store_true", help="mirroring off in every row")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(MLOPS_DATA_DIR=str(tmp / "data"), WANDB_MODE="disabled")
    try:
        model = (args.model or quick_model(tmp, env)).resolve()
        env.update(nnUNet_raw=str(tmp), nnUNet_preprocessed=str(tmp), nnUNet_results=str(tmp))  # silence warnings
        if (TASK / "dataset.json").is_file():
            scans = sorted((TASK / "imagesTr").glob("*.nii.gz")) + sorted((TASK / "imagesTs").glob("*.nii.gz"))
        else:
            scans = sorted((tmp / "Task500_Synthetic").glob("images*/*.nii.gz"))
        scans = [s for s in scans if not s.name.startswith(".")][: args.cases or None]
        inputs = as_nnunet_inputs(scans, tmp / "cases")
        tta = not args.no_tta
        flags = ["--model", str(model), "predict.folds=[0]", f"predict.tta={str(tta).lower()}"]
        rows: list[tuple[str, float, int, str]] = []
        for actors in (1, 2):
            dest = tmp / f"batch_{actors}"
            cmd = [str(BIN / "mlops"), "batch", str(inputs), "-o", str(dest), "--actors", str(actors), "--json",
                   *flags]  # fmt: skip
            wall, rss = timed_tree(cmd, env, stdout=tmp / f"batch_{actors}.json")
            summary = json.loads((tmp / f"batch_{actors}.json").read_text())
            note = f"Ray start {summary['ray_start_seconds']:.1f} s, pipeline {summary['seconds']:.1f} s"
            rows.append((f"mlops batch, {actors} actor(s)", wall, rss, note))
        mine = [str(BIN / "mlops"), "predict", str(inputs), "-o", str(tmp / "predict"), *flags]
        rows.append(("mlops predict folder/", *timed_tree(mine, env), ""))
        theirs = nnunet_cmd(inputs, tmp / "nnunet", model, "checkpoint_final.pth", tta)
        rows.append(("nnUNetv2_predict -i folder/", *timed_tree(theirs, env), ""))
        w = sys.stdout.write
        w(f"\n{len(scans)} cases, mirroring {'on' if tta else 'off'}, {os.cpu_count()} CPU cores, model {model.name}\n")
        w(f"{'':<30}{'wall s':>9}{'cases/s':>9}{'x nnU-Net':>11}{'peak RSS MiB':>14}  \n")
        nnunet_s = rows[-1][1]
        for name, wall, rss, note in rows:
            w(f"{name:<30}{wall:>9.1f}{len(scans) / wall:>9.2f}{nnunet_s / wall:>11.2f}{rss / 2**20:>14.0f}  {note}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
