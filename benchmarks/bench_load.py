"""Load on `mlops serve` (127.0.0.1 only): real scans alone vs real scans mixed with hostile uploads.

    python benchmarks/bench_load.py --model MODEL_DIR --seconds 10   # MODEL_DIR: a trained nnU-Net model folder
    python benchmarks/bench_load.py --model MODEL_DIR --seconds 60 --clients 4 16 --hostile-share 0.3

Starts one server with the production limits of configs/config.yaml, then for each number of clients runs a bounded
asyncio/httpx load twice: real scans only, and real scans with a share of hostile uploads (crafted headers, small
gzips that inflate to huge volumes, coarse voxels that resample to huge grids). Each client sends one request at a
time until the time is up, and after a 503 waits as Retry-After says. Prints throughput, latency percentiles of the
real scans, the 503 share, the 5xx count (must be 0) and the server's peak RSS sampled during each run.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.test_hostile import gzip_of_constant, header, volume  # noqa: E402  (the same crafted inputs as the tests)

from common import start_serve  # noqa: E402  (benchmarks/common.py)

SCANS = REPO.parent / "shared" / "data" / "Task04_Hippocampus" / "imagesTs"


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def hostile_bodies() -> list[tuple[str, bytes]]:
    return [
        ("c128_400.nii.gz", gzip_of_constant(header((400, 400, 400), 1792), 400**3 * 16, 0)),
        ("ones_400.nii.gz", gzip_of_constant(header((400, 400, 400), 2), 400**3, 1)),
        ("vox300mm.nii", volume(spacing=300.0)),
        ("vox1e-6.nii", volume(spacing=1e-6)),
        ("dim0_9.nii", header(dim=(9, 16, 16, 16, 1, 1, 1, 1)) + b"\0" * 16384),
        ("offset_nan.nii", header(vox_offset=float("nan")) + b"\0" * 16384),
        ("dtype_9999.nii", header(datatype=9999) + b"\0" * 16384),
        ("slope_3e38.nii", volume(datatype=4, scl_slope=3e38)),
        ("truncated.nii.gz", gzip.compress(volume())[:2000]),
    ]


def real_bodies(limit: int) -> list[tuple[str, bytes]]:
    files = sorted(SCANS.glob("*.nii.gz"))[:limit] if SCANS.is_dir() else []
    if not files:  # no shared data: the synthetic-like volume of the tests
        return [("synthetic.nii.gz", gzip.compress(volume((40, 40, 40))))]
    return [(f.name, f.read_bytes()) for f in files]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def run_load(url: str, pid: int, clients: int, seconds: float, real: list, hostile: list, share: float) -> dict:
    deadline = time.monotonic() + seconds
    results: list[tuple[bool, int, float]] = []
    peak = [rss(pid)]

    async def sample() -> None:
        while time.monotonic() < deadline:
            peak[0] = max(peak[0], rss(pid))
            await asyncio.sleep(0.2)

    async def client(seed: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            bad = bool(hostile) and rng.random() < share
            name, body = rng.choice(hostile if bad else real)
            t0 = time.perf_counter()
            try:
                resp = await http.post(f"{url}/predict", files={"file": (name, body)}, params={"tta": "false"})
                code = resp.status_code
            except httpx.HTTPError:
                code, resp = -1, None
            results.append((bad, code, time.perf_counter() - t0))
            if resp is not None and code == 503:  # a well-behaved client honours Retry-After
                await asyncio.sleep(min(float(resp.headers.get("retry-after", 1)), deadline - time.monotonic(), 5))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await asyncio.gather(sample(), *(client(i, http) for i in range(clients)))
    good = [dt for bad, code, dt in results if not bad and code == 200]
    pct = np.percentile(good, [50, 95, 99]) if good else [float("nan")] * 3
    return {
        "requests": len(results),
        "ok_per_s": len(good) / seconds,
        "p50": pct[0],
        "p95": pct[1],
        "p99": pct[2],
        "share_503": sum(code == 503 for _, code, _ in results) / max(1, len(results)),
        "hostile_4xx": sum(bad and 400 <= code < 500 for bad, code, _ in results),
        "n_5xx": sum(code >= 500 for _, code, _ in results if code != 503),
        "errors": sum(code == -1 for _, code, _ in results),
        "peak_rss_gib": peak[0] / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="trained nnU-Net model folder")
    parser.add_argument("--seconds", type=float, default=60, help="duration of each run (default 60)")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--hostile-share", type=float, default=0.3, help="share of hostile uploads in the mixed run")
    parser.add_argument("--scans", type=int, default=10, help="real scans to cycle through")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"))
    parser.add_argument("overrides", nargs="*", help="serve overrides, e.g. serve.max_in_flight=4")
    args = parser.parse_args()
    real, hostile = real_bodies(args.scans), hostile_bodies()
    serve_args = [f"predict.model_dir={args.model}", "predict.tta=false", "serve.record_stats=false", *args.overrides]
    proc, url = start_serve(serve_args, dict(os.environ), args.tmp / "bench_load_server.log")
    emit(f"server {url} pid {proc.pid}; {len(real)} real scans, {len(hostile)} hostile uploads; {args.seconds:g} s")
    head = f"{'clients':>7} {'load':>8} {'reqs':>5} {'ok/s':>6} {'p50 s':>6} {'p95 s':>6} {'p99 s':>6} "
    emit(head + f"{'503':>5} {'4xx':>4} {'5xx':>4} {'err':>4} {'peak RSS':>9}")
    try:
        for clients in args.clients:
            for label, bad in (("clean", []), ("hostile", hostile)):
                r = asyncio.run(run_load(url, proc.pid, clients, args.seconds, real, bad, args.hostile_share))
                emit(
                    f"{clients:>7} {label:>8} {r['requests']:>5} {r['ok_per_s']:>6.2f} {r['p50']:>6.2f} "
                    f"{r['p95']:>6.2f} {r['p99']:>6.2f} {r['share_503']:>5.0%} {r['hostile_4xx']:>4} "
                    f"{r['n_5xx']:>4} {r['errors']:>4} {r['peak_rss_gib']:>7.2f} GiB"
                )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
