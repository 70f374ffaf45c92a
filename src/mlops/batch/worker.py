"""The two Ray Data stages of a batch run: read an input's bytes, then segment it in a stateful actor.

Reading is a light task (I/O, no model) that also decides whether a case is already done: its output exists and
its record names the same weights and mirroring. Segmenting holds the same :class:`~mlops.inference.Segmenter` as
`mlops predict`, loaded once per actor, and decodes, checks and segments exactly as `mlops predict` does, so the
files are the same voxel for voxel and header for header. A bad case becomes a row with its error; it never raises,
so one junk file cannot fail a batch of thousands (Ray retries only what a dead actor left unfinished).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger
from omegaconf import DictConfig

from mlops.batch import sink
from mlops.dicom.series import Limits, part10
from mlops.errors import MlopsError
from mlops.volumes import to_gzip_bytes


def finished(row: dict[str, Any], model_sha256: str, tta: bool, force: bool, run_id: str) -> dict | None:
    """The record of a case already done by these weights and mirroring (with ``force``: by this very run), else None.

    A record is written only after its output, so record + output means a whole segmentation.
    """
    record = sink.read_record(str(row["record"]))
    if (
        record is not None
        and record.get("model_sha256") == model_sha256
        and bool(record.get("tta")) == tta
        and (not force or record.get("run_id") == run_id)
        and sink.exists(str(row["output"]))
    ):
        return record
    return None


def read_input(row: dict[str, Any], *, model_sha256: str, tta: bool, force: bool, run_id: str) -> dict[str, Any]:
    """The input's bytes, or the finished record that makes the case a skip, or the error that fails it."""
    row = dict(row, data=b"", done="", read_error=row.get("error") or "")
    if row["read_error"]:
        return row
    try:
        record = finished(row, model_sha256, tta, force, run_id)
        if record is not None:
            row["done"] = json.dumps(record)
            return row
        row["data"] = sink.read_bytes(row["input"])
    except FileNotFoundError:
        row["read_error"] = f"{row['input']}: no such file"
    except Exception as exc:  # permissions, a bucket that vanished: the row says so, the run goes on
        row["read_error"] = f"{row['input']}: cannot read it ({type(exc).__name__}: {exc})"
    return row


class SegmentActor:
    """One warm model per Ray actor; ``__call__`` segments a batch of read rows and returns their table rows."""

    def __init__(self, cfg: DictConfig, model_dir: str, model_uri: str | None, model_sha256: str, run_id: str) -> None:
        from mlops import pipeline  # torch stays out of the read tasks: the actor alone loads it
        from mlops.inference.fetch import fetch_model
        from mlops.monitoring.signals import SIGNAL_COLUMNS

        self.pipeline, self.signal_columns = pipeline, SIGNAL_COLUMNS

        # A model given by URL is fetched once per node (the driver's copy is on another machine in a cluster).
        folder = fetch_model(model_uri, Path(cfg.batch.model_cache)) if model_uri else Path(model_dir)
        self.segmenter = pipeline.load_segmenter(cfg, folder)
        self.tta = bool(cfg.predict.tta)
        self.model_sha256, self.run_id = model_sha256, run_id
        self.max_voxels = int(cfg.predict.max_voxels) if cfg.predict.get("max_voxels") else None
        self.budget = pipeline.budget(self.segmenter, cfg.predict.get("max_request_mib"))
        self.names = [name for value, name in sorted(self.segmenter.labels.items()) if value != 0]
        self.member_mib = float(cfg.monitor.max_member_mib)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.cfg = cfg
        self.dicom_limits = Limits.of(cfg.dicom)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = [self._one({k: v[i] for k, v in batch.items()}) for i in range(len(batch["case"]))]
        return {key: [r[key] for r in rows] for key in rows[0]}

    def _row(self, item: dict[str, Any], status: str, **values: Any) -> dict[str, Any]:
        row: dict[str, Any] = {
            "case": str(item["case"]),
            "subject": str(item["subject"]),
            "input": str(item["input"]),
            "output": str(item["output"]) if status != "failed" else None,
            "seg": None,  # a zipped DICOM series: its DICOM SEG, beside the NIfTI
            "status": status,
            "error": None,
            "shape": None,
            "spacing_mm": None,
            **{f"{name}_mm3": float("nan") for name in self.names},
            **dict.fromkeys(self.signal_columns, float("nan")),  # output signals (mlops.monitoring): model health
            "seconds": float("nan"),
            "model_sha256": self.model_sha256,
            "tta": self.tta,
            "backend": self.segmenter.backend,
            "precision": self.segmenter.precision,
            "run_id": self.run_id,
            "worker": self.worker,
        }
        row.update(values)
        return row

    def _from_record(self, item: dict[str, Any], status: str, record: dict) -> dict[str, Any]:
        """A finished case's row as its record has it (the run and worker that wrote it, its volumes, seconds)."""
        kept = {k: v for k, v in record.items() if k not in ("status", "case", "subject", "input", "output")}
        return self._row(item, status, **kept)

    def _one(self, item: dict[str, Any]) -> dict[str, Any]:
        if item["read_error"]:
            return self._row(item, "failed", error=str(item["read_error"]))
        if item["done"]:  # done by an earlier run
            return self._from_record(item, "skipped", json.loads(str(item["done"])))
        # Done by this run already: Ray retries the whole call of an actor that died, including the cases it wrote.
        mine = finished(item, self.model_sha256, self.tta, True, self.run_id)
        if mine is not None:
            return self._from_record(item, "ok", mine)
        t0 = time.perf_counter()
        name = str(item["input"])
        seg_url = None
        try:
            case, series = self.pipeline.decode_upload(  # a zipped DICOM series also gets its SEG, as predict -t both
                self.segmenter, bytes(item["data"]), name, self.max_voxels, self.budget, limits=self.dicom_limits
            )
            result = self.pipeline.segment_case(self.segmenter, case, self.tta, None, self.member_mib)
            if series is not None:
                seg_url = str(item["output"]).removesuffix(".nii.gz") + ".dcm"
                seg = self.pipeline.seg_for(self.segmenter, series, result.labels, self.cfg)
                sink.write_bytes(seg_url, part10(seg))
            sink.write_bytes(str(item["output"]), to_gzip_bytes(result.image))
        except MlopsError as exc:
            logger.warning(str(exc))
            return self._row(item, "failed", error=str(exc))
        except Exception as exc:  # a case the engine cannot handle must not stop the cohort
            logger.opt(exception=exc).debug(f"{name}: segmentation failed")
            return self._row(item, "failed", error=f"{name}: segmentation failed ({type(exc).__name__}: {exc})")
        signals = {k: result.signals.get(k) for k in self.signal_columns}
        row = self._row(
            item,
            "ok",
            shape="x".join(str(s) for s in result.labels.shape),
            spacing_mm="x".join(f"{z:g}" for z in case.spacing),
            **{f"{n}_mm3": float(v) for n, v in result.volumes.items()},
            **{k: float("nan") if v is None else float(v) for k, v in signals.items()},
            seconds=round(time.perf_counter() - t0, 3),
            seg=seg_url,
        )
        sink.write_record(str(item["record"]), row)  # after the output: a record means the output is whole
        return row
