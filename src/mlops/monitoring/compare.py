"""The drift verdict: current cases against the reference profile, one statistic at a time, corrected for testing many.

Each numerical statistic gets a two-sample Kolmogorov-Smirnov test; the orientation code gets a test of how many
current cases carry a code never seen in the reference. The p-values are adjusted with Benjamini-Hochberg (false
discovery rate ``alpha`` over all statistics tested); a statistic has drifted when its adjusted p-value is below
``alpha``. Below ``min_samples`` current cases there is no verdict ("not enough data"): a few requests can look
extreme by chance and K-S on them is meaningless. Statistics missing on either side are not tested.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats as st

from mlops.monitoring.signals import SIGNAL_COLUMNS
from mlops.monitoring.stats import CATEGORICAL_COLUMNS, GEOMETRY_COLUMNS, NORM_COLUMNS, RAW_COLUMNS

NOT_ENOUGH = "not enough data"
LABELS = {
    "intensity_mean": "Raw intensity mean", "intensity_std": "Raw intensity spread (std)",
    "intensity_min": "Raw intensity minimum", "intensity_max": "Raw intensity maximum",
    **{f"intensity_p{p}": f"Raw intensity {p}th percentile" for p in (1, 5, 50, 95, 99)},
    "zero_fraction": "Share of zero voxels",
    "shape_x": "Image size along x (voxels)", "shape_y": "Image size along y (voxels)",
    "shape_z": "Image size along z (voxels)", "spacing_x": "Voxel spacing x (mm)", "spacing_y": "Voxel spacing y (mm)",
    "spacing_z": "Voxel spacing z (mm)", "orientation": "Orientation code",
    "norm_std": "Normalised intensity spread (what the network sees)",
    **{f"norm_p{p}": f"Normalised intensity {p}th percentile (what the network sees)" for p in (1, 5, 50, 95, 99)},
    "norm_noise": "Noise index of the normalised image", "norm_bias": "Bias index (half-to-half intensity difference)",
    "confidence_foreground": "Model confidence on the predicted structure",
    "confidence_overall": "Model confidence over the whole volume",
    "entropy_foreground": "Prediction entropy on the predicted structure",
    "agreement_dice_mean": "Agreement between mirrored/fold predictions (Dice)",
    "agreement_dice_min": "Worst agreement between mirrored/fold predictions (Dice)",
    "foreground_fraction": "Share of the volume predicted as foreground",
}  # fmt: skip
NUMERIC_ORDER = [*NORM_COLUMNS, *SIGNAL_COLUMNS, *GEOMETRY_COLUMNS, *RAW_COLUMNS]


@dataclass
class ColumnDrift:
    column: str
    label: str
    test: str
    p_value: float
    score: float  # the Benjamini-Hochberg adjusted p-value, compared with the threshold
    threshold: float
    drifted: bool
    reference_median: float | None
    current_median: float | None
    line: str


@dataclass
class Outlier:
    case: str
    score: float  # largest robust z-score over the statistics
    column: str
    value: float
    reference_median: float


@dataclass
class DriftSummary:
    model: str
    reference_rows: int
    current_rows: int
    verdict: str  # drift | no drift | not enough data
    drift_share: float
    drifted_columns: list[str]
    dataset_drift: bool
    max_drift_share: float
    alpha: float
    min_samples: int
    correction: str
    summary_lines: list[str]
    columns: list[ColumnDrift]
    outliers: list[Outlier] = field(default_factory=list)
    html: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, allow_nan=False, default=str)


def benjamini_hochberg(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, capped at 1), in the input order."""
    m = len(p_values)
    if m == 0:
        return []
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p_values[i] * m / rank)
        adjusted[i] = min(1.0, running)
    return adjusted


def _values(rows: list[dict], column: str) -> np.ndarray:
    vals = [r.get(column) for r in rows]
    return np.asarray([float(v) for v in vals if isinstance(v, int | float) and math.isfinite(v)], dtype=np.float64)


def _change(ref: float, cur: float) -> str:
    if ref == 0:
        return f"{cur - ref:+.3g}"
    return f"{(cur - ref) / abs(ref):+.0%}"


def _numeric_test(column: str, ref: np.ndarray, cur: np.ndarray) -> tuple[float, float, float]:
    p = float(st.ks_2samp(ref, cur).pvalue) if (np.ptp(ref) > 0 or np.ptp(cur) > 0 or ref[0] != cur[0]) else 1.0
    return p, float(np.median(ref)), float(np.median(cur))


def _unseen_test(ref_rows: list[dict], cur_rows: list[dict], column: str) -> tuple[float, int, list[str]]:
    """p of seeing k current cases with a code absent from the n reference cases, if each had chance 1/(n+1)."""
    known = [r.get(column) for r in ref_rows if r.get(column) is not None]
    seen = set(known)
    current = [r.get(column) for r in cur_rows if r.get(column) is not None]
    unseen = [c for c in current if c not in seen]
    if not current or not seen:
        return 1.0, 0, []
    p = float(st.binom.sf(len(unseen) - 1, len(current), 1 / (len(known) + 1))) if unseen else 1.0
    return p, len(unseen), sorted(set(unseen))


def outliers(reference: list[dict], current: list[dict], columns: list[str], top: int = 10) -> list[Outlier]:
    """Current cases furthest from the reference: largest robust z-score (median, 1.4826 x MAD) over statistics."""
    found = []
    centres = {}
    for c in columns:
        ref = _values(reference, c)
        if ref.size:
            med = float(np.median(ref))
            mad = 1.4826 * float(np.median(np.abs(ref - med)))
            centres[c] = (med, mad if mad > 0 else max(abs(med) * 1e-3, 1e-6))
    for i, row in enumerate(current):
        best: tuple[float, str, float] | None = None
        for c, (med, scale) in centres.items():
            v = row.get(c)
            if isinstance(v, int | float) and math.isfinite(v):
                z = min(abs(v - med) / scale, 1e6)
                if best is None or z > best[0]:
                    best = (z, c, float(v))
        if best is not None:
            case = str(row.get("case") or row.get("id") or f"#{i + 1}")
            found.append(Outlier(case, round(best[0], 2), best[1], best[2], centres[best[1]][0]))
    return sorted(found, key=lambda o: -o.score)[:top]


def compare(
    reference: list[dict],
    current: list[dict],
    model: str = "",
    alpha: float = 0.05,
    min_samples: int = 20,
    max_drift_share: float = 0.0,
) -> DriftSummary:
    """The verdict of ``current`` against ``reference`` (rows of statistics); drifted statistics first."""
    tested: list[tuple[str, str, float, float | None, float | None, str]] = []  # column, test, p, ref, cur, detail
    for c in NUMERIC_ORDER:
        ref, cur = _values(reference, c), _values(current, c)
        if ref.size < 2 or cur.size < 1:
            continue
        p, rmed, cmed = _numeric_test(c, ref, cur)
        detail = f"current median {cmed:.3g} vs reference {rmed:.3g} ({_change(rmed, cmed)})"
        tested.append((c, "K-S", p, rmed, cmed, detail))
    for c in CATEGORICAL_COLUMNS:
        if any(c in r for r in reference) and any(c in r for r in current):
            p, k, codes = _unseen_test(reference, current, c)
            detail = f"{k} of {len(current)} current cases have a code never seen in the reference ({', '.join(codes)})"
            tested.append((c, "unseen category", p, None, None, detail if k else "every code seen in the reference"))
    adjusted = benjamini_hochberg([t[2] for t in tested])
    enough = len(current) >= min_samples
    columns = []
    for (c, test, p, rmed, cmed, detail), q in zip(tested, adjusted, strict=True):
        drifted = enough and q < alpha
        line = f"{LABELS.get(c, c)}: {detail}; {test} p = {p:.2g}, {q:.2g} after Benjamini-Hochberg"
        columns.append(ColumnDrift(c, LABELS.get(c, c), test, p, q, alpha, drifted, rmed, cmed, line))
    columns.sort(key=lambda d: (not d.drifted, d.score, NUMERIC_ORDER.index(d.column) if d.column in NUMERIC_ORDER
                                else 0))  # fmt: skip
    drifted = [d.column for d in columns if d.drifted]
    share = len(drifted) / len(columns) if columns and enough else 0.0
    if not enough:
        verdict = NOT_ENOUGH
        lines = [f"Not enough data: {len(current)} current case(s), at least {min_samples} are needed for a verdict "
                 "(monitor.min_samples)."]  # fmt: skip
    else:
        verdict = "drift" if drifted and share > max_drift_share else "no drift"
        lines = [d.line for d in columns if d.drifted] or [
            f"No statistic differs from the reference after Benjamini-Hochberg correction (FDR {alpha:g}) over "
            f"{len(columns)} statistics."
        ]
    numeric = [d.column for d in columns if d.test == "K-S"]
    return DriftSummary(
        model=model,
        reference_rows=len(reference),
        current_rows=len(current),
        verdict=verdict,
        drift_share=share,
        drifted_columns=drifted,
        dataset_drift=verdict == "drift",
        max_drift_share=max_drift_share,
        alpha=alpha,
        min_samples=min_samples,
        correction=f"Benjamini-Hochberg (false discovery rate {alpha:g} over {len(columns)} statistics)",
        summary_lines=lines,
        columns=columns,
        outliers=outliers(reference, current, numeric),
    )
