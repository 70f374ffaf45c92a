"""The drift verdict: current cases against the reference profile, one statistic at a time, corrected for testing many.

Each numerical statistic gets a two-sample Kolmogorov-Smirnov test; the orientation code gets a test of how many current
cases carry a code never seen in the reference. The p-values are adjusted with Benjamini-Hochberg (false discovery rate
``alpha`` over all statistics tested); a statistic has drifted when its adjusted p-value is below ``alpha`` AND, for a
numerical statistic, its current values have moved by at least ``min_shift_sd`` reference standard deviations
(Wasserstein distance over the robust SD, 1.4826 x MAD). The second condition is an effect-size floor: with a few
hundred cases a K-S test finds differences far too small to matter, such as the Decathlon's own test half of Task04,
whose normalised 99th percentile moved 0.5 SD from the training half (K-S p = 0.0008) while the model scores as well
on it. Such a significant but small difference is reported as a "small shift", never as drift. Below ``min_samples``
current cases there is no verdict ("not enough data"): a few requests can look extreme by chance and K-S on them is
meaningless. Statistics missing on either side are not tested.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from omegaconf import DictConfig
from scipy import stats as st

from mlops.monitoring.signals import SIGNAL_COLUMNS
from mlops.monitoring.stats import CATEGORICAL_COLUMNS, GEOMETRY_COLUMNS, NORM_COLUMNS, RAW_COLUMNS

NOT_ENOUGH = "not enough data"
ORDINALS = {1: "1st", 5: "5th", 50: "50th", 95: "95th", 99: "99th"}
LABELS = {
    "intensity_mean": "Raw intensity mean", "intensity_std": "Raw intensity spread (std)",
    "intensity_min": "Raw intensity minimum", "intensity_max": "Raw intensity maximum",
    **{f"intensity_p{p}": f"Raw intensity {o} percentile" for p, o in ORDINALS.items()},
    "zero_fraction": "Share of zero voxels",
    "shape_x": "Image size along x (voxels)", "shape_y": "Image size along y (voxels)",
    "shape_z": "Image size along z (voxels)", "spacing_x": "Voxel spacing x (mm)", "spacing_y": "Voxel spacing y (mm)",
    "spacing_z": "Voxel spacing z (mm)", "orientation": "Orientation code",
    "norm_std": "Normalised intensity spread (what the network sees)",
    **{f"norm_p{p}": f"Normalised intensity {o} percentile (what the network sees)" for p, o in ORDINALS.items()},
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
    shift_sd: float | None = None  # Wasserstein distance in reference SDs (None: categorical, or constant reference)
    small_shift: bool = False  # significant after correction, but under the effect-size floor: reported, not drift

    @property
    def status(self) -> str:
        return "drifted" if self.drifted else "small shift" if self.small_shift else "no"

    @property
    def shift_text(self) -> str:
        """The shift for a table cell: blank for a categorical test, "const. ref." where the reference is constant."""
        return "" if self.test != "K-S" else "const. ref." if self.shift_sd is None else f"{self.shift_sd:.2f}"


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
    min_shift_sd: float
    correction: str
    summary_lines: list[str]
    columns: list[ColumnDrift]
    outliers: list[Outlier] = field(default_factory=list)
    small_shifts: list[str] = field(default_factory=list)
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


def robust_sd(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of a normal sample, unmoved by outliers."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _numeric_test(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float, float, float]:
    """K-S p-value, both medians, and the size of the shift in reference SDs (inf where the reference is constant).

    The size is the Wasserstein-1 distance over the reference's robust SD: how far current values must move, on
    average, to match the reference. A location shift of d SD scores d; 40% of cases moved by 2 SD scores 0.8; so it
    sees a shifted subgroup that leaves the median alone.
    """
    p = float(st.ks_2samp(ref, cur).pvalue) if (np.ptp(ref) > 0 or np.ptp(cur) > 0 or ref[0] != cur[0]) else 1.0
    distance = float(st.wasserstein_distance(ref, cur))
    sd = robust_sd(ref) or float(np.std(ref))  # more than half the reference equal: fall back to the plain SD
    shift = distance / sd if sd > 0 else (0.0 if distance == 0 else math.inf)
    return p, float(np.median(ref)), float(np.median(cur)), shift


def thresholds(cfg: DictConfig) -> dict[str, float | int]:
    """compare()'s settings from a composed config: ``monitor.alpha, min_samples, min_shift_sd`` and
    ``drift.max_drift_share``."""
    return {
        "alpha": float(cfg.monitor.alpha),
        "min_samples": int(cfg.monitor.min_samples),
        "min_shift_sd": float(cfg.monitor.min_shift_sd),
        "max_drift_share": float(cfg.drift.max_drift_share),
    }


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
            med, mad = float(np.median(ref)), robust_sd(ref)
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
    min_shift_sd: float = 1.0,
) -> DriftSummary:
    """The verdict of ``current`` against ``reference`` (rows of statistics); drifted statistics first."""
    tested: list[tuple[str, str, float, float | None, float | None, float | None, str]] = []
    for c in NUMERIC_ORDER:
        ref, cur = _values(reference, c), _values(current, c)
        if ref.size < 2 or cur.size < 1:
            continue
        p, rmed, cmed, shift = _numeric_test(ref, cur)
        moved = ("constant in the reference" if math.isinf(shift)
                 else "over 1000 reference SD" if shift > 1000 else f"{shift:.1f} reference SD")  # fmt: skip
        detail = f"current median {cmed:.3g} vs reference {rmed:.3g} ({_change(rmed, cmed)}, {moved})"
        tested.append((c, "K-S", p, rmed, cmed, shift, detail))
    for c in CATEGORICAL_COLUMNS:
        if any(c in r for r in reference) and any(c in r for r in current):
            p, k, codes = _unseen_test(reference, current, c)
            detail = f"{k} of {len(current)} current cases have a code never seen in the reference ({', '.join(codes)})"
            tested.append((c, "unseen category", p, None, None, None, detail if k else "every code seen in the "
                           "reference"))  # fmt: skip
    adjusted = benjamini_hochberg([t[2] for t in tested])
    enough = len(current) >= min_samples
    columns = []
    for (c, test, p, rmed, cmed, shift, detail), q in zip(tested, adjusted, strict=True):
        significant = enough and q < alpha
        large = shift is None or shift >= min_shift_sd
        line = f"{LABELS.get(c, c)}: {detail}; {test} p = {p:.2g}, {q:.2g} after Benjamini-Hochberg"
        if significant and not large:
            line = f"Small shift, not drift (under {min_shift_sd:g} SD): {line}"
        shift_sd = None if shift is None or math.isinf(shift) else round(shift, 3)
        columns.append(ColumnDrift(c, LABELS.get(c, c), test, p, q, alpha, significant and large, rmed, cmed, line,
                                   shift_sd, significant and not large))  # fmt: skip
    columns.sort(key=lambda d: (not d.drifted, not d.small_shift, d.score,
                                NUMERIC_ORDER.index(d.column) if d.column in NUMERIC_ORDER else 0))  # fmt: skip
    drifted = [d.column for d in columns if d.drifted]
    small = [d.column for d in columns if d.small_shift]
    share = len(drifted) / len(columns) if columns and enough else 0.0
    if not enough:
        verdict = NOT_ENOUGH
        lines = [f"Not enough data: {len(current)} current case(s), at least {min_samples} are needed for a verdict "
                 "(monitor.min_samples)."]  # fmt: skip
    else:
        verdict = "drift" if drifted and share > max_drift_share else "no drift"
        lines = [d.line for d in columns if d.drifted] or [
            f"No statistic drifted: none differs from the reference by at least {min_shift_sd:g} reference SD with "
            f"significance after Benjamini-Hochberg correction (FDR {alpha:g}) over {len(columns)} statistics."
        ]
        lines += [d.line for d in columns if d.small_shift]
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
        min_shift_sd=min_shift_sd,
        correction=f"Benjamini-Hochberg (false discovery rate {alpha:g} over {len(columns)} statistics)",
        summary_lines=lines,
        columns=columns,
        outliers=outliers(reference, current, numeric),
        small_shifts=small,
    )
