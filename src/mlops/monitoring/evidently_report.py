"""Evidently's data drift report over the per-case statistics, with our verdict rules as its per-column methods.

- each numerical statistic's method is a registered Evidently stat test whose score is the shift in reference spreads
  (:func:`~mlops.monitoring.compare.shift_size`, log scale for raw intensities) and which detects drift when the K-S
  p-value is under the report's threshold, the Benjamini-Hochberg cut-off of this comparison, and the shift reaches
  ``monitor.min_shift_sd``;
- the orientation code's method scores the p-value of codes never seen in the reference, against the same cut-off;
- the dataset drift share is set so that Evidently's "share >= drift_share" is our "share > drift.max_drift_share";
- without enough current cases the cut-off is 0: nothing is detected, as our verdict says ("not enough data").

Importing Evidently takes seconds (pandas, plotly, its metric registry), so :mod:`mlops.monitoring.report` loads this
module only when a report is built: the service starts without it.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.core.report import Snapshot
from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
from evidently.legacy.core import ColumnType
from evidently.presets import DataDriftPreset

from mlops.monitoring.compare import DriftSummary, ks_p_value, shift_size, unseen_test

SCORE_CAP = 1000.0  # a shift shown as 1000: constant reference statistic, or 1000 reference SD and more
UNSEEN_METHOD = "mlops_unseen_code"
_registered: set[str] = set()


def numeric_method(min_shift_sd: float) -> str:
    """The registered Evidently stat test for numerical statistics with this effect-size floor; its name."""
    name = f"mlops_ks_shift_{min_shift_sd:g}sd"
    if name in _registered:
        return name

    def test(reference: pd.Series, current: pd.Series, feature_type: Any, threshold: float) -> tuple[float, bool]:
        ref, cur = reference.dropna().to_numpy(np.float64), current.dropna().to_numpy(np.float64)
        if ref.size < 2 or cur.size < 1:
            return 0.0, False
        shift = shift_size(ref, cur, str(reference.name))
        return min(shift, SCORE_CAP), bool(ks_p_value(ref, cur) < threshold and shift >= min_shift_sd)

    register_stattest(
        StatTest(
            name=name,
            display_name=f"shift in SD; drift: K-S p < BH cut-off, shift >= {min_shift_sd:g}",
            allowed_feature_types=[ColumnType.Numerical],
        ),
        test,
    )
    _registered.add(name)
    return name


def _unseen(reference: pd.Series, current: pd.Series, feature_type: Any, threshold: float) -> tuple[float, bool]:
    p, _, _ = unseen_test(reference.dropna().tolist(), current.dropna().tolist())
    return p, p < threshold


def _register_unseen() -> None:
    if UNSEEN_METHOD not in _registered:
        register_stattest(
            StatTest(
                name=UNSEEN_METHOD,
                display_name="p of unseen codes; drift: < BH cut-off",
                allowed_feature_types=[ColumnType.Categorical],
            ),
            _unseen,
        )
        _registered.add(UNSEEN_METHOD)


def evidently_drift_share(max_drift_share: float, columns: int) -> float:
    """Evidently's dataset drift needs share >= drift_share; ours, share > max_drift_share: the smallest share of
    whole columns above ours."""
    return min(1.0, (math.floor(max_drift_share * columns + 1e-9) + 1) / columns)


def _frame(rows: list[dict], numeric: list[str], categorical: list[str]) -> pd.DataFrame:
    def number(v: Any) -> float:
        return float(v) if isinstance(v, int | float) and math.isfinite(v) else math.nan

    data = {c: [number(r.get(c)) for r in rows] for c in numeric}
    data.update({c: [None if r.get(c) is None else str(r.get(c)) for r in rows] for c in categorical})
    return pd.DataFrame(data, columns=[*numeric, *categorical])


def snapshot(summary: DriftSummary, reference: list[dict], current: list[dict]) -> Snapshot | None:
    """Evidently's data drift report of the statistics ``summary`` tested; None when it tested none (no current
    case yet)."""
    numeric = [c.column for c in summary.columns if c.test == "K-S"]
    categorical = [c.column for c in summary.columns if c.test != "K-S"]
    if not summary.columns or not current:
        return None
    method = numeric_method(summary.min_shift_sd)
    _register_unseen()
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    preset = DataDriftPreset(
        columns=[*numeric, *categorical],
        per_column_method={**dict.fromkeys(numeric, method), **dict.fromkeys(categorical, UNSEEN_METHOD)},
        threshold=summary.bh_cutoff,
        drift_share=evidently_drift_share(summary.max_drift_share, len(summary.columns)),
    )
    with warnings.catch_warnings():  # Evidently's histograms of constant columns divide by zero, harmlessly
        warnings.simplefilter("ignore", RuntimeWarning)
        return Report([preset]).run(
            Dataset.from_pandas(_frame(current, numeric, categorical), data_definition=definition),
            Dataset.from_pandas(_frame(reference, numeric, categorical), data_definition=definition),
        )


def evidently_figures(snap: Snapshot) -> tuple[int, float, dict[str, float]]:
    """What Evidently's report shows, read back from its snapshot: (drifted statistics, their share, each
    statistic's drift score)."""
    count, share, scores = 0, 0.0, {}
    for metric in snap.dict()["metrics"]:
        config = metric.get("config", {})
        if config.get("type", "").endswith("DriftedColumnsCount"):
            count, share = int(metric["value"]["count"]), float(metric["value"]["share"])
        elif config.get("type", "").endswith("ValueDrift"):
            scores[config["column"]] = float(metric["value"])
    return count, share, scores
