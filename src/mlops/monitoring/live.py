"""The service's side of monitoring: the model key and profile found at start-up, the request store, one record per
prediction, and the live drift comparison behind ``GET /monitoring/drift``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loguru import logger
from omegaconf import DictConfig

from mlops.errors import MlopsError
from mlops.monitoring.compare import DriftSummary, compare, thresholds
from mlops.monitoring.profile import model_key, profile_path, profile_reference, read_profile
from mlops.monitoring.store import RequestStore, read_records


class LiveMonitor:
    """Built once the model is loaded; every method is safe to call from worker threads."""

    def __init__(self, cfg: DictConfig, segmenter: Any) -> None:
        self.cfg = cfg
        self.model_dir = Path(segmenter.model_dir)
        self.model_name = self.model_dir.name
        self.max_member_mib = float(cfg.monitor.max_member_mib)
        model = getattr(segmenter, "model", None)
        self.key = model_key(model.checkpoint_files()) if model is not None else "unknown"
        self.folds = [str(f) for f in segmenter.folds]
        self.profile_file = profile_path(self.model_dir, self.folds)
        self.profile: dict | None = None
        if self.profile_file.is_file():
            try:
                self.profile = read_profile(self.model_dir, self.folds)
            except MlopsError as exc:
                logger.warning(str(exc))
        if self.profile is not None and self.profile.get("model_key") != self.key:
            logger.warning(f"{self.profile_file}: made for model key {self.profile.get('model_key')}, "
                           f"not {self.key} (other checkpoints); live drift compares against it anyway")  # fmt: skip
        self.store = (
            RequestStore(str(cfg.monitor.store), self.key, float(cfg.monitor.flush_s))
            if cfg.serve.get("record_stats")
            else None
        )
        logger.info(f"Monitoring: model key {self.key}, profile {'yes' if self.profile else 'none'}, "
                    f"records {'-> ' + str(cfg.monitor.store) if self.store else 'off'}")  # fmt: skip

    def record(self, stats: dict[str, Any]) -> None:
        """Store one request's statistics; monitoring never fails a prediction."""
        if self.store is None:
            return
        try:
            self.store.record(stats)
        except Exception as exc:
            logger.warning(f"could not store request statistics: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self.store is not None:
            try:
                self.store.flush()
            except Exception as exc:
                logger.warning(f"could not flush request statistics: {type(exc).__name__}: {exc}")

    def drift(self) -> tuple[DriftSummary, list[dict], list[dict]]:
        """(summary, reference rows, current rows) of the records so far against the model's profile."""
        if self.profile is None:
            raise MlopsError(f"{self.profile_file}: no reference profile for this model; `mlops monitor profile` "
                             "writes one")  # fmt: skip
        self.close()  # this instance's latest records are read back with the others'
        try:
            current = read_records(str(self.cfg.monitor.store), self.key)
        except MlopsError as exc:  # the report still shows the reference; the log says why nothing is compared
            logger.warning(f"drift: no request records read ({exc})")
            current = []
        reference = profile_reference(self.profile)
        summary = compare(reference, current, model=self.model_name, **thresholds(self.cfg))
        summary.reference_rows = len(self.profile["reference"])
        return summary, reference, current
