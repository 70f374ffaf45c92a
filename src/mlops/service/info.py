"""``GET /info``: what a client needs to know about the model before sending a scan (and what the page shows)."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from loguru import logger

from mlops import __version__
from mlops.evaluate import model_validation_warnings
from mlops.palette import palette
from mlops.volumes import label_names


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def training_dice(model_dir: Path, folds: list[Any]) -> dict[str, Any] | None:
    """nnU-Net's validation Dice of the folds in use (``fold_N/validation/summary.json``), averaged; None if absent."""
    per_fold = []
    for fold in folds:
        summary = Path(model_dir) / f"fold_{fold}" / "validation" / "summary.json"
        try:
            per_fold.append(json.loads(summary.read_text()))
        except FileNotFoundError:
            return None  # not validated (e.g. train.validate=false): /info says so with null
        except (OSError, ValueError) as exc:
            logger.warning(f"{summary}: unreadable nnU-Net validation summary ({type(exc).__name__})")
            return None
    if not per_fold:
        return None
    labels = sorted(per_fold[0].get("mean", {}), key=lambda k: int(k) if k.isdigit() else 0)
    try:
        per_label = {k: round(sum(s["mean"][k]["Dice"] for s in per_fold) / len(per_fold), 4) for k in labels}
        foreground = round(sum(s["foreground_mean"]["Dice"] for s in per_fold) / len(per_fold), 4)
    except (KeyError, TypeError) as exc:
        logger.warning(f"{model_dir}: validation summaries without the expected Dice fields ({exc!r})")
        return None
    return {"foreground_mean": foreground, "per_label": per_label, "folds": [str(f) for f in folds]}


def model_info(segmenter: Any) -> dict[str, Any]:
    """Labels (id -> name) and their colours, channels, model folder, folds, configuration, training Dice, versions."""
    model_dir = Path(segmenter.model_dir)
    dataset_json = getattr(getattr(segmenter, "model", None), "dataset_json", None) or {}
    channels = dataset_json.get("channel_names") or {str(c): f"channel {c}" for c in range(segmenter.num_channels)}
    parts = model_dir.name.split("__")  # nnU-Net's folder name: Trainer__Plans__configuration
    return {
        "labels": label_names(segmenter.labels),
        "colours": palette(segmenter.labels),
        "channels": {str(k): v for k, v in channels.items()},
        "model": model_dir.name,
        "dataset": model_dir.parent.name,
        "folds": [str(f) for f in segmenter.folds],
        "configuration": parts[-1] if len(parts) == 3 else None,
        "training_dice": training_dice(model_dir, list(segmenter.folds)),
        # The CLI's warning when a label's validation Dice is near zero: the page shows it too.
        "warnings": model_validation_warnings(model_dir, list(segmenter.folds)),
        "versions": {"mlops": __version__, "nnunetv2": _version("nnunetv2"), "torch": _version("torch")},
        "device": str(segmenter.device),
        "backend": segmenter.backend,
        "precision": segmenter.precision,
    }
