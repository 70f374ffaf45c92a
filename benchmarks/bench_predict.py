"""Our inference engine against nnU-Net's own, on the same model and cases, with the parity figures beside the speed.

Rows, each measured in its own process (so its peak RSS is its own), mirroring on and off:
- floor: nnU-Net's ``nnUNetPredictor.predict_single_npy_array`` in process, warm (preprocessing and export included);
- ``nnUNetv2_predict_from_modelfolder``, one process per case (what a script around nnU-Net pays per case);
- ours: ``mlops.inference.Segmenter.segment`` (the same scope as the floor) for every backend x precision; a
  combination this machine refuses (bf16 without native support) is listed with the reason.
Cases: the real Task04 test scans (../shared/data) when present, else the synthetic ones; and one volume that needs
many tiles (the real spleen CT of ../shared/data/odd_volumes, else a synthetic 160^3 volume).
Then a folder of every case: `mlops predict folder/` against `nnUNetv2_predict_from_modelfolder -i folder/`.
Parity (mirroring on): per-case Dice per label of each row against the floor's labels (minimum and mean), voxels that
differ, and the largest absolute difference of softmax probabilities.

    python benchmarks/bench_predict.py [--model MODEL_DIR] [--checkpoint checkpoint_final.pth] [--repeats 3]
Without --model, a synthetic task is prepared and trained briefly on CPU first (about two minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED = REPO.parent / "shared/data"
REAL_CASES = SHARED / "Task04_Hippocampus/imagesTs"
BIG_CASE = SHARED / "odd_volumes/ivadomed_data_testing/ct_scan/sub-spleen2/ct/sub-spleen2_ct.nii.gz"
OURS = [("torch", "fp32"), ("openvino", "fp32"), ("onnxruntime", "fp32"), ("torch", "bf16"), ("openvino", "bf16")]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


# --------------------------------------------------------------------------------------------- one row, in a worker
def worker(spec: dict) -> dict:
    """Time one predictor on the cases; save its labels and probabilities for the parity check when asked."""
    import nibabel as nib
    import torch

    from mlops import nnunet
    from mlops.errors import MlopsError

    cases = [(Path(p).name, nib.load(p)) for p in spec["cases"]]
    arrays = [(n, np.asanyarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])) for n, img in cases]
    t0 = time.perf_counter()
    chosen = "nnunet fp32"
    if spec["kind"] == "floor":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(
            use_mirroring=spec["tta"], perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False
        )
        predictor.initialize_from_trained_model_folder(spec["model"], (0,), spec["checkpoint"])

        def nnunet_order(data: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, dict]:
            """nibabel (i, j, k) -> nnU-Net's (c, z, y, x) with spacing (z, y, x), as SimpleITK would read it."""
            return np.ascontiguousarray(data.transpose(2, 1, 0)[None], np.float32), {"spacing": list(spacing[::-1])}

        def segment(data: np.ndarray, spacing: tuple[float, ...]) -> object:
            return predictor.predict_single_npy_array(*nnunet_order(data, spacing))

        def probabilities(data: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
            return predictor.predict_single_npy_array(*nnunet_order(data, spacing), None, None, True)
    else:
        from mlops.inference import Segmenter

        try:
            seg = Segmenter(
                Path(spec["model"]),
                folds=[0],
                checkpoint=spec["checkpoint"],
                device="cpu",
                tta=spec["tta"],
                backend=spec["backend"],
                precision=spec["precision"],
                max_batch=spec.get("max_batch"),
            )
        except MlopsError as exc:
            return {"refused": str(exc).split(": ", 1)[-1]}
        chosen = f"{seg.backend} {seg.precision}"

        def segment(data: np.ndarray, spacing: tuple[float, ...]) -> object:
            return seg.segment(data, spacing)

        def probabilities(data: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
            prepared = seg.prepare(data, spacing)
            return nnunet.logits_to_segmentation(seg.model, seg.logits(prepared), prepared.props, probabilities=True)

    load_s = time.perf_counter() - t0
    segment(*arrays[0][1:])  # warm-up
    latencies: dict[str, list[float]] = {n: [] for n, _, _ in arrays}
    for _ in range(spec["repeats"]):
        for name, data, spacing in arrays:
            t = time.perf_counter()
            segment(data, spacing)
            latencies[name].append(time.perf_counter() - t)
    if spec.get("save"):
        out = {}
        for name, data, spacing in arrays:
            labels, probs = probabilities(data, spacing)
            out[f"{name}/labels"], out[f"{name}/probs"] = np.asarray(labels), np.asarray(probs, np.float32)
        np.savez(spec["save"], **out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"load_s": load_s, "latencies": latencies, "peak_rss": peak, "chosen": chosen}


def run_worker(spec: dict, tmp: Path) -> dict:
    path = tmp / f"spec_{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {spec['kind']} {spec.get('backend')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- whole processes
def timed_tree(cmd: list[str], env: dict[str, str], stdout: Path | None = None) -> tuple[float, int]:
    """Wall time and the peak summed RSS of a command and all its children (nnU-Net spawns workers).

    Its standard output is dropped, or written to ``stdout`` when given.
    """
    t0 = time.perf_counter()
    sink = stdout.open("wb") if stdout else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.PIPE)
    peak, root = 0, psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    if stdout:
        sink.close()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{err.decode()[-3000:]}")
    return time.perf_counter() - t0, peak


def nnunet_cmd(inp: Path, out: Path, model: Path, checkpoint: str, tta: bool) -> list[str]:
    cmd = [str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(inp), "-o", str(out), "-m", str(model),
           "-f", "0", "-chk", checkpoint, "-device", "cpu"]  # fmt: skip
    return cmd if tta else [*cmd, "--disable_tta"]


def as_nnunet_inputs(cases: list[Path], folder: Path) -> Path:
    """nnU-Net's naming (``case_0000.nii.gz``, channel 0), as symlinks."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        (folder / case.name.replace(".nii.gz", "_0000.nii.gz")).symlink_to(case.resolve())
    return folder


# --------------------------------------------------------------------------------------------- parity
def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total


def parity(reference: Path, candidate: Path, labels: list[int]) -> dict[str, float]:
    ref, got = np.load(reference), np.load(candidate)
    names = sorted({k.rsplit("/", 1)[0] for k in ref.files})
    per_case = []
    differ = prob = 0.0
    for name in names:
        a, b = got[f"{name}/labels"], ref[f"{name}/labels"]
        per_case.append([dice(a, b, k) for k in labels])
        differ += float((a != b).sum())
        prob = max(prob, float(np.abs(got[f"{name}/probs"] - ref[f"{name}/probs"]).max()))
    scores = np.array(per_case)
    return {"min": float(scores.min()), "mean": float(scores.mean()), "voxels": differ, "prob": prob}


# --------------------------------------------------------------------------------------------- main
def make_big(tmp: Path) -> Path:
    import nibabel as nib

    if BIG_CASE.is_file():
        return BIG_CASE
    rng = np.random.default_rng(0)
    path = tmp / "synthetic_160.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(100, 20, (160, 160, 160)).astype(np.float32), np.eye(4)), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--cases", type=Path, help="folder of .nii.gz cases (default: the real Task04 test scans)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the cases per row")
    parser.add_argument("--big-repeats", type=int, default=2, help="passes over the many-tile case (0: leave it out)")
    parser.add_argument("--max-batch", type=int, help="patches per forward pass of ours (default: predict.max_batch)")
    parser.add_argument("--per-case-runs", type=int, default=5, help="cases run through nnUNetv2_predict one by one")
    parser.add_argument("--mirroring", choices=["both", "on", "off"], default="both", help="rows with mirroring on/off")
    parser.add_argument("--combos", help="ours to measure, e.g. openvino:bf16,torch:fp32 (default: all, then auto)")
    args = parser.parse_args()
    if args.worker:
        sys.stdout.write(json.dumps(worker(json.loads(args.worker.read_text()))) + "\n")
        return

    tmp = Path(tempfile.mkdtemp())
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(MLOPS_DATA_DIR=str(tmp / "data"), WANDB_MODE="disabled")
    env.update(nnUNet_raw=str(tmp), nnUNet_preprocessed=str(tmp), nnUNet_results=str(tmp))  # silence its warnings
    try:
        if args.model is None:
            from bench_serve import make_model

            args.model = make_model(tmp, env)
        model = args.model.resolve()
        folder = args.cases or (REAL_CASES if REAL_CASES.is_dir() else tmp / "Task500_Synthetic/imagesTs")
        cases = sorted(folder.glob("*.nii.gz"))
        big = make_big(tmp)
        export = [str(BIN / "mlops"), "export", "--model", str(model), f"predict.checkpoint={args.checkpoint}"]
        done = subprocess.run(export, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        labels = [int(k) for k in json.loads((model / "dataset.json").read_text())["labels"].values() if int(k)]
        settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.mirroring]
        rows = [row for tta in settings for row in measure_rows(args, model, cases, big, tta, tmp, env)]
        inputs = as_nnunet_inputs(cases, tmp / "folder")
        theirs = timed_tree(nnunet_cmd(inputs, tmp / "folder_nnunet", model, args.checkpoint, True), env)
        mine = [str(BIN / "mlops"), "predict", str(inputs), "-o", str(tmp / "folder_ours"), "--model", str(model),
                f"predict.checkpoint={args.checkpoint}", "predict.folds=[0]"]  # fmt: skip
        report(rows, big, cases, folder, (*theirs, *timed_tree(mine, env)))
        w = sys.stdout.write
        w(f"\nParity against nnU-Net's predictor, mirroring on (per-case Dice of labels {labels}):\n")
        w(f"{'':<30}{'min Dice':>10}{'mean Dice':>11}{'voxels differ':>15}{'max |dp|':>10}\n")
        for backend, precision in ours(args):
            path = tmp / f"{backend}_{precision}.npz"
            if path.is_file():
                p = parity(tmp / "nnunet_fp32.npz", path, labels)
                line = f"{p['min']:>10.4f}{p['mean']:>11.4f}{int(p['voxels']):>15d}{p['prob']:>10.2e}"
                w(f"{'ours ' + backend + ' ' + precision:<30}{line}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure_rows(
    args: argparse.Namespace, model: Path, cases: list[Path], big: Path, tta: bool, tmp: Path, env: dict[str, str]
) -> list[tuple[str, bool, dict, dict]]:
    """(name, mirroring, figures on the cases, on the big case) for the floor, each of ours, nnUNetv2_predict."""
    rows = []
    for kind, backend, precision in [("floor", "nnunet", "fp32"), *(("ours", b, p) for b, p in ours(args))]:
        spec = {"kind": kind, "backend": backend, "precision": precision, "tta": tta, "model": str(model),
                "checkpoint": args.checkpoint, "max_batch": args.max_batch}  # fmt: skip
        save = str(tmp / f"{backend}_{precision}.npz") if tta else None
        small = run_worker({**spec, "cases": [str(c) for c in cases], "repeats": args.repeats, "save": save}, tmp)
        large = {}
        if "refused" not in small and args.big_repeats > 0:
            large = run_worker({**spec, "cases": [str(big)], "repeats": args.big_repeats}, tmp)
        name = "nnU-Net predictor (floor)" if kind == "floor" else f"ours {backend} {precision}"
        if backend == "auto":
            name = f"ours auto = {small.get('chosen', '?')}"
        rows.append((name, tta, small, large))
        sys.stderr.write(f"measured {name}, mirroring {'on' if tta else 'off'}\n")
    runs = []
    inputs = as_nnunet_inputs(cases[: args.per_case_runs], tmp / f"per_case_{tta}")
    for i, case in enumerate(sorted(inputs.iterdir())):
        single = tmp / f"single_{tta}_{i}"
        single.mkdir()
        (single / case.name).symlink_to(case.resolve())
        runs.append(timed_tree(nnunet_cmd(single, tmp / f"out_{tta}_{i}", model, args.checkpoint, tta), env))
    figures = {"latencies": {"all": [t for t, _ in runs]}, "peak_rss": max(m for _, m in runs) // 1024}
    rows.append(("nnUNetv2_predict, a process per case", tta, figures, {}))
    return rows


def ours(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Our combinations to measure: --combos, else every one, then `auto` (what this model's parity check picks)."""
    if args.combos:
        return [tuple(c.split(":", 1)) for c in args.combos.split(",")]  # type: ignore[misc]
    return [*OURS, ("auto", "auto")]


def median(figures: dict) -> float:
    """p50 over every latency a worker recorded (nan when the row was not run)."""
    return pct([t for v in figures["latencies"].values() for t in v], 50) if figures else float("nan")


def report(rows: list, big: Path, cases: list[Path], folder: Path, folder_run: tuple) -> None:
    w = sys.stdout.write
    floor = {tta: (median(small), median(large)) for name, tta, small, large in rows if name.endswith("(floor)")}
    w(f"{len(cases)} cases from {folder}; many-tile case {big.name}; {os.cpu_count()} CPU cores; model fold 0\n")
    w(f"{'':<40}{'mirror':>7}{'p50 s':>8}{'p95 s':>8}{'x floor':>8}{'peak MiB':>9}"
      f"{'big s':>8}{'x floor':>8}{'big MiB':>9}\n")  # fmt: skip
    for name, tta, small, large in rows:
        if "refused" in small:
            w(f"{name:<40}{'on' if tta else 'off':>7}  refused: {small['refused']}\n")
            continue
        lat = [t for v in small["latencies"].values() for t in v]
        small_floor, big_floor = floor[tta]
        p50, big_s = pct(lat, 50), median(large)
        rss, big_rss = small["peak_rss"] / 1024, large.get("peak_rss", float("nan")) / 1024
        w(f"{name:<40}{'on' if tta else 'off':>7}{p50:>8.3f}{pct(lat, 95):>8.3f}{p50 / small_floor:>8.2f}{rss:>9.0f}"
          f"{big_s:>8.1f}{big_s / big_floor:>8.2f}{big_rss:>9.0f}\n")  # fmt: skip
    theirs_s, theirs_rss, ours_s, ours_rss = folder_run
    w(f"\nFolder of {len(cases)} cases, mirroring on, wall time and peak RSS of the process tree:\n")
    w(f"  nnUNetv2_predict_from_modelfolder -i folder  {theirs_s:7.1f} s  {theirs_rss / 2**20:7.0f} MiB\n")
    w(f"  mlops predict folder                         {ours_s:7.1f} s  {ours_rss / 2**20:7.0f} MiB\n")
    w(f"  ratio (ours / nnU-Net): {ours_s / theirs_s:.2f}x time, {ours_rss / theirs_rss:.2f}x memory\n")


if __name__ == "__main__":
    main()
