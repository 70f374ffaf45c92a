"""Warm /predict latency and throughput, against the in-process floor and the naive subprocess-per-request service.

For one hippocampus-sized case (a real Task04 test case when ../shared/data is present, else a synthetic one):
- floor: nnU-Net's nnUNetPredictor.predict_single_npy_array in-process on the same array, same settings;
- ours: POST /predict to a running `mlops serve` (model loaded once), client-side latency;
- naive: `nnUNetv2_predict` in a subprocess per request (what an earlier attempt did).
Then throughput with 1, 2, 4 concurrent clients and the server's peak resident memory under that load, and a
bounded Locust run on loopback. Prints figures and ratios; targets: p50 <= 1.25x floor, >= 10x faster than naive.

    python benchmarks/bench_serve.py [--model MODEL_DIR] [--tta] [--repeats 20]
Without --model, a synthetic task is prepared and trained briefly on CPU first (about two minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

from common import start_serve  # benchmarks/common.py

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REAL_CASE = REPO.parent / "shared/data/Task04_Hippocampus/imagesTs"


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def make_model(tmp: Path, env: dict[str, str]) -> Path:
    task = tmp / "Task500_Synthetic"
    for cmd in (
        ["synth", str(task), "--train", "12", "--test", "2"],
        ["prepare", str(task)],
        ["train", "--fold", "0", "dataset.id=500", "train=quick", "train.validate=false", "wandb.mode=disabled"],
    ):
        subprocess.run([str(BIN / "mlops"), *cmd], env=env, check=True, capture_output=True)
    return tmp / "data/nnUNet_results/Dataset500_Synthetic/nnUNetTrainer__nnUNetPlans__3d_fullres"


def floor_latency(model: Path, case: Path, tta: bool, repeats: int) -> list[float]:
    """nnU-Net's own predictor in this process: the best a service can do."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(os.cpu_count() or 1)
    p = nnUNetPredictor(
        use_mirroring=tta, perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False
    )
    p.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    data, props = SimpleITKIO().read_images([str(case)])
    p.predict_single_npy_array(data, props)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p.predict_single_npy_array(data, props)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tta", action="store_true", help="mirroring TTA on (default off)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--naive-repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update(MLOPS_DATA_DIR=str(tmp / "data"), WANDB_MODE="disabled")
    try:
        model = args.model or make_model(tmp, env)
        cases = sorted(REAL_CASE.glob("*.nii.gz")) or sorted((tmp / "Task500_Synthetic/imagesTs").glob("*.nii.gz"))
        case = cases[0]
        body, flag = case.read_bytes(), "true" if args.tta else "false"

        floor = floor_latency(model, case, args.tta, args.repeats)

        server, base = start_serve([f"predict.model_dir={model}", "serve.max_in_flight=4"], env, tmp / "serve.log")
        url = f"{base}/predict?tta={flag}"
        try:
            client = httpx.Client(timeout=300)
            client.post(url, files={"file": (case.name, body)})  # warm-up
            ours = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                r = client.post(url, files={"file": (case.name, body)})
                ours.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text

            proc, peak, stop = psutil.Process(server.pid), [0], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], proc.memory_info().rss)
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            throughput = {}
            per_client = max(2, args.repeats // 2)
            for clients in (1, 2, 4):

                def run(_: int) -> int:
                    with httpx.Client(timeout=300) as c:
                        return sum(
                            c.post(url, files={"file": (case.name, body)}).status_code == 200 for _ in range(per_client)
                        )

                t0 = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    ok = sum(pool.map(run, range(clients)))
                throughput[clients] = ok / (time.perf_counter() - t0)
            stop.set()
            sampler.join()

            locust_line = "locust not installed"
            if shutil.which("locust", path=str(BIN)):
                out = subprocess.run(
                    [str(BIN / "locust"), "-f", str(REPO / "benchmarks/locustfile.py"), "--headless", "-u", "4",
                     "-r", "4", "-t", "15s", "--host", base, "--only-summary"],
                    env={**env, "MLOPS_LOCUST_CASE": str(case)}, capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                agg = [ln for ln in (out.stdout + out.stderr).splitlines() if "Aggregated" in ln]
                locust_line = agg[0].strip() if agg else (out.stderr[-300:] or "no summary")
        finally:
            server.terminate()
            server.wait(timeout=30)

        naive = []
        nn_env = dict(env)
        nn_env.update(nnUNet_results=str(model.parent.parent), nnUNet_raw=str(tmp), nnUNet_preprocessed=str(tmp))
        inp = tmp / "naive_in"
        inp.mkdir(exist_ok=True)
        shutil.copy(case, inp / case.name.replace(".nii.gz", "_0000.nii.gz"))
        dataset = model.parent.name
        for i in range(args.naive_repeats):
            cmd = [str(BIN / "nnUNetv2_predict"), "-i", str(inp), "-o", str(tmp / f"naive_out{i}"), "-d", dataset,
                   "-c", "3d_fullres", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"]  # fmt: skip
            if not args.tta:
                cmd.append("--disable_tta")
            t0 = time.perf_counter()
            subprocess.run(cmd, env=nn_env, check=True, capture_output=True)
            naive.append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        f"case {case.name} ({'real Task04' if REAL_CASE in case.parents else 'synthetic'}), "
        f"TTA {'on' if args.tta else 'off'}, {os.cpu_count()} CPU cores, {args.repeats} repeats",
        f"{'':<34}{'p50 (s)':>9}{'p95 (s)':>9}",
        f"{'floor: nnUNetPredictor in-process':<34}{pct(floor, 50):>9.3f}{pct(floor, 95):>9.3f}",
        f"{'ours: POST /predict (warm)':<34}{pct(ours, 50):>9.3f}{pct(ours, 95):>9.3f}",
        f"{'naive: nnUNetv2_predict subprocess':<34}{pct(naive, 50):>9.3f}{pct(naive, 95):>9.3f}",
        f"ours / floor (p50): {pct(ours, 50) / pct(floor, 50):.2f}x  (target <= 1.25)",
        f"naive / ours (p50): {pct(naive, 50) / pct(ours, 50):.1f}x faster  (target >= 10)",
        "throughput (requests/s): " + ", ".join(f"{c} client(s) {t:.2f}" for c, t in throughput.items()),
        f"server peak RSS under load: {peak[0] / 2**20:.0f} MiB",
        f"locust (4 users, 15 s): {locust_line}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
