"""`mlops drift`: do the test (or live) scans look like the training scans? Per-volume statistics + Evidently.

Each volume becomes one row of intensity statistics (mean, std, min, max, percentiles, share of zero voxels), shape
and voxel spacing. Evidently's DataDriftPreset compares the training rows (reference) with the test rows (current)
column by column and writes a self-contained HTML report; the JSON summary lists what drifted, with the test used
and its score. Intensity scale varies by orders of magnitude between scanners (as in the real Task04), which is
exactly what this report should surface before a model meets such data.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from loguru import logger
from omegaconf import DictConfig

from mlops.config import save_config
from mlops.decathlon import read_task
from mlops.errors import ConfigError, DatasetError
from mlops.progress import parallel_map, workers_for

PERCENTILES = (1, 5, 50, 95, 99)
STAT_COLUMNS = [
    "intensity_mean",
    "intensity_std",
    "intensity_min",
    "intensity_max",
    *(f"intensity_p{p}" for p in PERCENTILES),
    "zero_fraction",
    "shape_x",
    "shape_y",
    "shape_z",
    "spacing_x",
    "spacing_y",
    "spacing_z",
]


def array_stats(data: np.ndarray, zooms: tuple[float, ...]) -> dict[str, float]:
    """Statistics of one volume (first channel of a multi-channel volume)."""
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {data.shape}")
    values = data.astype(np.float64, copy=False).ravel()
    pct = np.percentile(values, PERCENTILES)
    row = {
        "intensity_mean": float(values.mean()),
        "intensity_std": float(values.std()),
        "intensity_min": float(values.min()),
        "intensity_max": float(values.max()),
        **{f"intensity_p{p}": float(v) for p, v in zip(PERCENTILES, pct, strict=True)},
        "zero_fraction": float(np.count_nonzero(values == 0) / values.size),
    }
    row.update({f"shape_{a}": float(s) for a, s in zip("xyz", data.shape, strict=True)})
    row.update({f"spacing_{a}": float(z) for a, z in zip("xyz", zooms[:3], strict=True)})
    return row


def volume_stats(path: Path) -> dict[str, float | str]:
    """Statistics of one NIfTI file; errors name the file."""
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        row: dict[str, float | str] = {"case": path.name, **array_stats(data, img.header.get_zooms())}
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable volume ({type(exc).__name__}: {exc})") from exc
    return row


def task_images(source: Path, require_test: bool = True) -> tuple[list[Path], list[Path]]:
    """(training images, test images) of a Decathlon task folder or a prepared nnU-Net raw dataset folder."""
    meta_path = source / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{source}: no dataset.json (expected a Decathlon task or an nnU-Net raw dataset folder)")
    meta = json.loads(meta_path.read_text())
    if "channel_names" in meta:  # nnU-Net raw dataset: channel 0 files

        def listing(folder: str) -> list[Path]:
            return sorted(p for p in (source / folder).glob("*_0000.nii*") if not p.name.startswith("."))

        train, test = listing("imagesTr"), listing("imagesTs") if (source / "imagesTs").is_dir() else []
    else:
        task = read_task(source)
        train, test = [c.image for c in task.training], [c.image for c in task.test]
    if not train:
        raise DatasetError(f"{source}: no training images")
    if not test and require_test:
        raise DatasetError(f"{source}: no test images (imagesTs) to compare with the training images")
    return train, test


def collect(paths: list[Path], workers: int, description: str) -> list[dict]:
    """Statistics of many volumes, read in parallel processes, with a progress bar; order follows ``paths``."""
    return parallel_map(volume_stats, paths, workers, description)


@dataclass
class ColumnDrift:
    column: str
    test: str
    score: float
    threshold: float
    drifted: bool


@dataclass
class DriftSummary:
    reference_rows: int
    current_rows: int
    drift_share: float
    drifted_columns: list[str]
    dataset_drift: bool
    max_drift_share: float
    columns: list[ColumnDrift]
    html: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _drifted(method: str, score: float, threshold: float) -> bool:
    """Evidently's convention: p-value tests drift below the threshold, distances at or above it."""
    if math.isnan(score):
        return False
    return score < threshold if "p_value" in method else score >= threshold


def evidently_report(
    reference: list[dict], current: list[dict], html: Path, summary_json: Path, max_drift_share: float
) -> DriftSummary:
    """Run Evidently's DataDriftPreset on the statistic columns; write the HTML report and the JSON summary."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = [c for c in STAT_COLUMNS if any(c in r for r in reference)]
    ref, cur = pd.DataFrame(reference)[columns], pd.DataFrame(current)[columns]
    definition = DataDefinition(numerical_columns=columns)
    snapshot = Report([DataDriftPreset(drift_share=max_drift_share)]).run(
        current_data=Dataset.from_pandas(cur, data_definition=definition),
        reference_data=Dataset.from_pandas(ref, data_definition=definition),
    )
    results = snapshot.dict()["metrics"]
    per_column, share = [], 0.0
    for m in results:
        cfg = m["config"]
        if cfg["type"].endswith("DriftedColumnsCount"):
            share = float(m["value"]["share"])
        elif cfg["type"].endswith("ValueDrift"):
            score = float(m["value"])
            per_column.append(
                ColumnDrift(cfg["column"], cfg["method"], score, float(cfg["threshold"]), False)
            )  # fmt: skip
    for c in per_column:
        c.drifted = _drifted(c.test, c.score, c.threshold)
    drifted = [c.column for c in per_column if c.drifted]
    if per_column and abs(len(drifted) / len(per_column) - share) > 1e-9:
        logger.warning(f"drift share {share:.3f} from Evidently differs from per-column decisions ({drifted})")
    html.parent.mkdir(parents=True, exist_ok=True)
    tmp = html.with_name(html.name + ".tmp")
    snapshot.save_html(str(tmp))
    tmp.replace(html)
    summary = DriftSummary(
        reference_rows=len(ref),
        current_rows=len(cur),
        drift_share=share,
        drifted_columns=drifted,
        dataset_drift=share > max_drift_share,
        max_drift_share=max_drift_share,
        columns=per_column,
        html=str(html),
    )
    summary_json.parent.mkdir(parents=True, exist_ok=True)
    summary_json.write_text(summary.to_json())
    return summary


def read_request_log(path: Path) -> list[dict]:
    """Statistics the service recorded for the volumes it segmented (one JSON object per line)."""
    if not path.is_file():
        raise DatasetError(f"{path}: no request statistics yet (the service writes them when serve.record_stats=true)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise DatasetError(f"{path}: no requests recorded yet")
    return rows


class RequestLog:
    """Appends per-request volume statistics as JSON lines (thread-safe; one line per served volume)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, name: str, data: np.ndarray, zooms: tuple[float, ...]) -> None:
        row = {"time": time.time(), "case": name, **array_stats(data, zooms)}
        with self._lock, self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def drift_source(cfg: DictConfig) -> Path:
    """``drift.source``, else this dataset's prepared raw folder, else ``dataset.source`` when it is a folder."""
    if cfg.drift.get("source"):
        return Path(cfg.drift.source)
    from mlops.prepare import dataset_identity

    raw = Path(os.environ.get("nnUNet_raw") or cfg.paths.raw) / dataset_identity(cfg).folder
    if (raw / "dataset.json").is_file():
        return raw
    if Path(cfg.dataset.source).is_dir():
        return Path(cfg.dataset.source)
    raise DatasetError(f"{raw}: no prepared dataset, and {cfg.dataset.source} is not a folder; pass SOURCE")


def run_drift(cfg: DictConfig) -> DriftSummary:
    """Compare the training volumes with the test volumes (``drift.current=test``) or the served ones (``requests``)."""
    mode = str(cfg.drift.current)
    if mode not in ("test", "requests"):
        raise ConfigError(f"drift.current must be 'test' or 'requests', got {mode!r}")
    source = drift_source(cfg)
    if not source.is_dir():
        raise DatasetError(f"{source}: no such folder")
    train, test = task_images(source, require_test=mode == "test")
    workers = workers_for([*train, *test], int(cfg.drift.num_workers))
    reference = collect(train, workers, f"Statistics of {len(train)} training volumes")
    if mode == "test":
        current = collect(test, workers, f"Statistics of {len(test)} test volumes")
    else:
        current = read_request_log(Path(cfg.drift.requests_log))
    logger.info(f"Evidently drift report: {len(current)} current vs {len(reference)} reference volumes")
    html = Path(cfg.drift.html)
    summary = evidently_report(reference, current, html, Path(cfg.drift.summary), float(cfg.drift.max_drift_share))
    save_config(cfg, html.with_name(html.stem + "_config.yaml"))
    return summary
