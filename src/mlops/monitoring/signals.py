"""Output signals of one prediction, from the engine's logits on the network's grid; no labels needed.

- confidence: mean max-softmax probability over the predicted foreground and over the whole volume;
- entropy: mean softmax entropy over the predicted foreground, divided by log(classes) (0 = certain, 1 = uniform);
- agreement: mean and minimum pairwise foreground Dice between ensemble members (folds, or with one fold the mirrored
  passes of test-time augmentation); low agreement means the members disagree. ``None`` without members.
Label volumes (mL, on the input's grid) are added by the caller, which has the exported segmentation.
"""

from __future__ import annotations

import itertools
import math

import torch

SIGNAL_COLUMNS = [
    "confidence_foreground",
    "confidence_overall",
    "entropy_foreground",
    "agreement_dice_mean",
    "agreement_dice_min",
    "foreground_fraction",
]


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Foreground (label > 0) Dice of two label maps; two empty maps agree fully (1.0)."""
    fa, fb = a > 0, b > 0
    total = int(fa.sum()) + int(fb.sum())
    return 1.0 if total == 0 else 2.0 * int((fa & fb).sum()) / total


def output_signals(logits: torch.Tensor, members: list[torch.Tensor] | None = None) -> dict[str, float | None]:
    """Signals of logits (k, z, y, x); ``members``: per-member argmax labels from the engine (may be empty)."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=0)
    top, labels = probs.max(dim=0)
    fg = labels > 0
    n_fg = int(fg.sum())
    k = logits.shape[0]
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(0) / math.log(k) if k > 1 else torch.zeros_like(top)
    row: dict[str, float | None] = {
        "confidence_foreground": float(top[fg].mean()) if n_fg else None,
        "confidence_overall": float(top.mean()),
        "entropy_foreground": float(entropy[fg].mean()) if n_fg else None,
        "agreement_dice_mean": None,
        "agreement_dice_min": None,
        "foreground_fraction": n_fg / labels.numel(),
    }
    if members and len(members) > 1:
        pairs = [dice(a, b) for a, b in itertools.combinations(members, 2)]
        row["agreement_dice_mean"] = sum(pairs) / len(pairs)
        row["agreement_dice_min"] = min(pairs)
    return row


def volume_signals(volumes_mm3: dict[str, float]) -> dict[str, float]:
    """Label volumes as record columns (``volume_ml_<label>``), background left out."""
    return {f"volume_ml_{name}": mm3 / 1000 for name, mm3 in volumes_mm3.items() if name != "background"}


def observe(
    segmenter: object,
    prepared: object,
    tta: bool | None = None,
    cancel: object = None,
    max_member_mib: float = 1024,
) -> tuple[torch.Tensor, dict[str, float | None]]:
    """Logits of a prepared case and their output signals; members are collected only within ``max_member_mib``."""
    data = prepared.data  # type: ignore[attr-defined]
    classes = segmenter.model.num_classes  # type: ignore[attr-defined]
    use_tta = segmenter.default_tta if tta is None else tta  # type: ignore[attr-defined]
    mirrors = 2 ** len(segmenter.model.mirror_axes) if use_tta else 1  # type: ignore[attr-defined]
    cost = classes * int(data[0].numel()) * 4 * (mirrors if len(segmenter.folds) == 1 else 0)  # type: ignore[attr-defined]
    members: list[torch.Tensor] | None = [] if cost <= max_member_mib * 2**20 else None
    logits = segmenter.logits(prepared, tta, cancel, members)  # type: ignore[attr-defined]
    return logits, output_signals(logits, members)
