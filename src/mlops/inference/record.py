"""The parity check's record, ``inference_check.json`` in the model folder: one entry per set of weights.

:mod:`mlops.inference.check` writes it; :class:`~mlops.inference.segmenter.Segmenter` reads it to let ``auto`` pick
the fastest backend x precision that passed. Apart from both, so that neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from mlops.files import write_atomic
from mlops.inference.export import weights_sha256

CHECK_NAME = "inference_check.json"


def write_entry(model_dir: Path, entry: dict) -> None:
    """Keep one entry per set of weights (e.g. fold 0 alone and the five-fold ensemble); atomic replace."""
    path = model_dir / CHECK_NAME
    entries = [e for e in _read_all(path) if e.get("weights_sha256") != entry["weights_sha256"]]
    write_atomic(path, json.dumps({"version": 1, "checks": [*entries, entry]}, indent=2))
    logger.info(f"Parity check written to {path}")


def _read_all(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("checks", []))
    except (OSError, ValueError, AttributeError) as exc:
        logger.warning(f"{path}: unreadable parity check ({exc}); `mlops export` writes a new one")
        return []


def check_entry(model_dir: Path, checkpoints: list[Path]) -> dict | None:
    """The check made with exactly these checkpoints (same weights, same folds), or None."""
    entries = _read_all(Path(model_dir) / CHECK_NAME)
    if not entries:
        return None
    key = weights_sha256(checkpoints)
    return next((e for e in entries if e.get("weights_sha256") == key), None)


def passed_fastest_first(entry: dict | None) -> list[dict] | None:
    """The combinations of a check that passed, fastest first; None without a check."""
    if entry is None:
        return None
    return sorted((r for r in entry.get("results", []) if r.get("passed")), key=lambda r: float(r["seconds_per_case"]))
