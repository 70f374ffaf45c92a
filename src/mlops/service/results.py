"""The JSON form of a `POST /predict` answer, for clients that want numbers rather than a NIfTI."""

from __future__ import annotations

from typing import Any

from mlops.volumes import label_names


def wants_json(format: str | None, accept: str) -> bool:
    """``?format=json`` or an ``Accept`` that names ``application/json`` (``?format=nifti`` wins over Accept)."""
    if format is not None:
        return format == "json"
    return "application/json" in accept.lower()


def json_result(volumes_mm3: dict[str, float], seconds: float, segmenter: Any) -> dict[str, Any]:
    """Label volumes (mm³ and mL, keyed by name), label ids, timing and the model that answered."""
    return {
        "volumes_mm3": volumes_mm3,
        "volumes_ml": {name: round(mm3 / 1000, 6) for name, mm3 in volumes_mm3.items()},
        "labels": label_names(segmenter.labels),
        "seconds": round(seconds, 3),
        "model": segmenter.model_dir.name,
        "folds": [str(f) for f in segmenter.folds],
        "device": str(segmenter.device),
        "backend": segmenter.backend,
    }
