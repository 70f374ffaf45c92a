"""`mlops drift`: do the test (or live) scans, and the model's answers, look like what it was trained and validated on?

The reference is the model's profile (:mod:`mlops.monitoring.profile`: training inputs raw and as the network sees
them, geometry, validation output signals), or, for a model without one, raw statistics of the source's training
images. The current cases are the source's test images (``drift.current=test``) or the service's request records for
this model (``requests``, from ``monitor.store``). The verdict is :func:`mlops.monitoring.compare.compare`'s
(K-S per statistic, Benjamini-Hochberg, a minimum sample size, a per-case range check); the report is Evidently's
(:mod:`mlops.monitoring.report`).

Each comparison has its own file names, so one never replaces another: ``drift_train_vs_test`` (the source's training
images against its test images), ``drift_profile_vs_test`` (the model's profile against the test images) and
``drift_requests`` (the profile, or the training images, against what the service segmented); each with ``.html``,
``_summary.json``, ``_evidently.json`` (the Evidently snapshot) and ``_config.yaml``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from loguru import logger
from omegaconf import DictConfig

from mlops.config import save_config
from mlops.errors import ConfigError, DatasetError, MlopsError
from mlops.files import write_atomic
from mlops.models import model_dir
from mlops.monitoring.compare import DriftSummary, compare, thresholds
from mlops.monitoring.profile import input_row, model_key, profile_path, profile_reference, read_profile
from mlops.monitoring.report import write_report
from mlops.monitoring.stats import orientation, raw_stats
from mlops.monitoring.store import read_records
from mlops.pipeline import load_segmenter
from mlops.progress import parallel_map, track, workers_for
from mlops.volumes import read_case_arrays
from mlops.workspace import available_folds, config_folds, source_folder, task_images


def volume_stats(path: Path) -> dict[str, float | str]:
    """Statistics of one NIfTI file; errors name the file."""
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        row: dict[str, float | str] = {"case": path.name, **raw_stats(data, img.header.get_zooms())}
        row["orientation"] = orientation(img.affine)
    except Exception as exc:
        raise DatasetError(f"{path}: unreadable volume ({type(exc).__name__}: {exc})") from exc
    return row


def collect(paths: list[Path], workers: int, description: str) -> list[dict]:
    """Statistics of many volumes, read in parallel processes, with a progress bar; order follows ``paths``."""
    return parallel_map(volume_stats, paths, workers, description)


def _model_folder(cfg: DictConfig) -> Path | None:
    try:
        return model_dir(cfg)
    except MlopsError:
        return None


def compare_to_profile(profile: dict, current: list[dict], cfg: DictConfig) -> DriftSummary:
    """The verdict of ``current`` against a model's profile with the configured alpha and minimum sample size."""
    summary = compare(
        profile_reference(profile),
        current,
        model=str(profile.get("model", "")),
        **thresholds(cfg),
    )
    summary.reference_rows = len(profile["reference"])
    return summary


def run_drift(cfg: DictConfig) -> DriftSummary:
    """Compare the test volumes (``drift.current=test``) or the served ones (``requests``) with the reference."""
    mode, ref_mode = str(cfg.drift.current), str(cfg.drift.get("reference", "auto"))
    if mode not in ("test", "requests"):
        raise ConfigError(f"drift.current must be 'test' or 'requests', got {mode!r}")
    folder = _model_folder(cfg)
    folds = _folds(cfg, folder)
    has_profile = folder is not None and bool(folds) and profile_path(folder, folds).is_file()
    if ref_mode == "profile" and not has_profile:
        read_profile(folder or Path(str(cfg.predict.get("model_dir") or "model")), folds or ["0"])  # raises
    profile = read_profile(folder, folds) if has_profile and ref_mode != "source" else None  # type: ignore[arg-type]
    source, train, test = None, [], []
    if profile is None or mode == "test":
        source = source_folder(cfg)
        if not source.is_dir():
            raise DatasetError(f"{source}: no such folder")
        train, test = task_images(source, require_test=mode == "test")
    if profile is not None:
        reference = profile_reference(profile)
        model = str(profile.get("model", ""))
    else:
        workers = workers_for([*train, *test], int(cfg.drift.num_workers))
        reference = collect(train, workers, f"Statistics of {len(train)} training volumes")
        model = folder.name if folder is not None and (folder / "plans.json").is_file() else source.name  # type: ignore[union-attr]
    if mode == "test":
        current = (
            test_image_rows(cfg, folder, test)
            if profile is not None
            else collect(test, workers_for(test, int(cfg.drift.num_workers)), f"Statistics of {len(test)} test volumes")
        )
    else:
        key = profile["model_key"] if profile is not None else _key_of(cfg, folder)
        current = read_records(str(cfg.monitor.store), key)
    name = "drift_requests" if mode == "requests" else f"drift_{'profile' if profile is not None else 'train'}_vs_test"
    reference_cases = len(profile["reference"]) if profile is not None else len(reference)
    signals = len(reference) - reference_cases
    extra = f" (+{signals} validation output signals)" if signals else ""
    logger.info(f"Drift ({name}): {len(current)} current vs {reference_cases} reference cases{extra} ({model})")
    if profile is not None:
        summary = compare_to_profile(profile, current, cfg)
    else:
        summary = compare(reference, current, model=model, **thresholds(cfg))
    html, summary_json = report_paths(cfg, name)
    write_report(summary, reference, current, html)
    summary.summary_file = str(summary_json)
    write_atomic(summary_json, summary.to_json())
    save_config(cfg, html.with_name(html.stem + "_config.yaml"))
    return summary


def report_paths(cfg: DictConfig, name: str) -> tuple[Path, Path]:
    """(HTML report, summary JSON): ``drift.html`` / ``drift.summary`` when set, else ``<paths.reports>/<name>.html``
    and ``<name>_summary.json``."""
    reports = Path(str(cfg.paths.reports))
    html = Path(cfg.drift.html) if cfg.drift.get("html") else reports / f"{name}.html"
    summary = Path(cfg.drift.summary) if cfg.drift.get("summary") else reports / f"{name}_summary.json"
    return html, summary


def _folds(cfg: DictConfig, folder: Path | None) -> list[int | str]:
    """``predict.folds``, or (null) every fold of the model that has the checkpoint; [] without a model."""
    if folder is None or not (folder / "plans.json").is_file():
        return []
    chosen = config_folds(cfg)
    return available_folds(folder, str(cfg.predict.checkpoint)) if chosen is None else chosen


def _key_of(cfg: DictConfig, folder: Path | None) -> str:
    folds = _folds(cfg, folder)
    if folder is None or not folds:
        raise DatasetError("--current requests needs the model whose requests to read: no trained model found")
    return model_key([folder / f"fold_{f}" / str(cfg.predict.checkpoint) for f in folds])


def test_image_rows(cfg: DictConfig, folder: Path | None, images: list[Path]) -> list[dict]:
    """Input statistics of test images as the model's profile has them (raw, normalised, geometry)."""
    segmenter = load_segmenter(cfg, folder)  # type: ignore[arg-type]
    rows = []
    for path in track(images, f"Statistics of {len(images)} test volumes", total=len(images)):
        data, spacing, affine = read_case_arrays(path, int(segmenter.num_channels))
        row, _ = input_row(segmenter, data, spacing, affine)
        rows.append({"case": path.name, **row})
    return rows
