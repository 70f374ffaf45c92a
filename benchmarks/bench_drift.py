"""Statistics extraction for `mlops drift`: serial against parallel, over the real Task04 volumes (170 + 30).

python benchmarks/bench_drift.py [TASK_FOLDER] [--workers 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mlops.drift import collect
from mlops.workspace import task_images

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", nargs="?", default=str(REPO.parent / "shared/data/Task04_Hippocampus"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    train, test = task_images(Path(args.task))
    paths = train + test
    timings = {}
    for workers in (1, args.workers):
        t0 = time.perf_counter()
        rows = collect(paths, workers, f"{workers} worker(s)")
        timings[workers] = time.perf_counter() - t0
        assert len(rows) == len(paths)
    serial, parallel = timings[1], timings[args.workers]
    sys.stdout.write(
        f"{len(paths)} volumes: serial {serial:.2f} s ({len(paths) / serial:.0f} volumes/s), "
        f"{args.workers} workers {parallel:.2f} s ({len(paths) / parallel:.0f} volumes/s), "
        f"speed-up {serial / parallel:.2f}x\n"
    )


if __name__ == "__main__":
    main()
