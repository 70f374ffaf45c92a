"""Monitoring without labels: output signals and the engine's member hook, the verdict (K-S + Benjamini-Hochberg +
minimum samples), the request store (local and memory://), the reference profile, the live service, alert rules."""

from __future__ import annotations

import math
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from mlops.inference.window import mirror_combinations, sliding_window_logits
from mlops.monitoring.compare import NOT_ENOUGH, benjamini_hochberg, compare
from mlops.monitoring.report import render
from mlops.monitoring.signals import dice, output_signals
from mlops.monitoring.stats import normalised_stats, raw_stats
from mlops.monitoring.store import RequestStore, read_records

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "monitoring"


# --- the engine's hook and the output signals ----------------------------------------------------------------------


def _asymmetric_runner(weight: float = 1.0):
    """A stand-in network (the hook's arithmetic, not a model, is under test): logits depend on position, so
    mirrored passes disagree; class 1 wins where the smoothed input is high."""

    def run(batch: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, batch.shape[-1]).view(1, 1, 1, 1, -1)
        fg = weight * batch[:, :1] + 0.8 * ramp
        return torch.cat([torch.zeros_like(fg), fg], dim=1)

    return run


def test_member_hook_leaves_logits_unchanged_and_collects_each_mirror_or_fold() -> None:
    torch.manual_seed(0)
    data = torch.randn(1, 20, 24, 28)
    args = ((12, 12, 16), 2, 0.5, (0, 1, 2), 8, torch.device("cpu"))
    plain = sliding_window_logits(data, [_asymmetric_runner()], *args)
    members: list[torch.Tensor] = []
    hooked = sliding_window_logits(data, [_asymmetric_runner()], *args, members=members)
    assert torch.equal(plain, hooked)  # the default answer is bit-identical with the hook on
    assert len(members) == len(mirror_combinations((0, 1, 2))) == 8
    assert all(m.shape == data.shape[1:] and m.dtype == torch.uint8 for m in members)
    pairs = [dice(members[0], m) for m in members[1:]]
    assert min(pairs) < 0.99  # the position-dependent runner makes mirrored passes disagree
    folds: list[torch.Tensor] = []
    sliding_window_logits(data, [_asymmetric_runner(1.0), _asymmetric_runner(-1.0)], *args, members=folds)
    assert len(folds) == 2 and dice(folds[0], folds[1]) < 0.9  # opposite folds disagree
    none: list[torch.Tensor] = []
    sliding_window_logits(data, [_asymmetric_runner()], *args[:3], None, *args[4:], members=none)
    assert none == []  # no mirroring, one fold: nothing to compare


def test_output_signals_are_exact() -> None:
    p = torch.tensor([0.9, 0.6, 0.2, 0.1])  # foreground probability of 4 voxels, 2 classes
    logits = torch.stack([torch.log(1 - p), torch.log(p)]).view(2, 1, 2, 2)
    a = torch.tensor([[[1, 1], [0, 0]]], dtype=torch.uint8)
    b = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    s = output_signals(logits, [a, a, b])
    assert s["confidence_foreground"] == pytest.approx((0.9 + 0.6) / 2)
    assert s["confidence_overall"] == pytest.approx((0.9 + 0.6 + 0.8 + 0.9) / 4)
    h = [-(q * math.log(q) + (1 - q) * math.log(1 - q)) / math.log(2) for q in (0.9, 0.6)]
    assert s["entropy_foreground"] == pytest.approx(sum(h) / 2)
    assert s["agreement_dice_mean"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert s["agreement_dice_min"] == pytest.approx(2 / 3)
    assert s["foreground_fraction"] == 0.5
    empty = output_signals(torch.stack([torch.zeros(1, 2, 2), -torch.ones(1, 2, 2)]))
    assert empty["confidence_foreground"] is None and empty["agreement_dice_mean"] is None


def test_normalised_statistics_see_noise_and_bias() -> None:
    _z, y, x = np.mgrid[0:32, 0:32, 0:32].astype(np.float32)
    smooth = np.sin(x / 6) + np.cos(y / 7)  # smooth anatomy: neighbours differ little
    noisy = smooth + np.random.default_rng(0).normal(0, 0.5, smooth.shape)
    assert normalised_stats(noisy[None])["norm_noise"] > 3 * normalised_stats(smooth[None])["norm_noise"]
    texture = np.sin(x / 2) + np.cos(y / 3)  # no trend across the volume
    assert normalised_stats((texture + x / 8)[None])["norm_bias"] > 3 * normalised_stats(texture[None])["norm_bias"]
    raw = raw_stats(np.arange(1000, dtype=np.float32).reshape(10, 10, 10), (2.0, 1.0, 0.5))
    assert raw["intensity_p50"] == 499.5 and raw["spacing_x"] == 2.0 and raw["zero_fraction"] == 0.001


# --- the verdict ----------------------------------------------------------------------------------------------------


def test_benjamini_hochberg_matches_scipy() -> None:
    from scipy.stats import false_discovery_control

    p = [*list(np.random.default_rng(3).uniform(0, 0.2, 17)), 1e-09, 0.5]
    assert benjamini_hochberg(p) == pytest.approx(list(false_discovery_control(p, method="bh")))


def _rows(n: int, seed: int, shift: float = 0.0, orientation: str = "RAS") -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"norm_p99": float(2 + shift + rng.normal(0, 0.3)), "norm_noise": float(rng.normal(0.1, 0.01)),
         "intensity_mean": float(rng.lognormal(6, 1)), "spacing_z": 1.0, "orientation": orientation,
         "confidence_foreground": float(rng.uniform(0.85, 0.95)), "id": f"r{seed}-{i}"}
        for i in range(n)
    ]  # fmt: skip


def test_verdict_orders_drifted_first_and_explains_each() -> None:
    reference, current = _rows(120, 0), _rows(30, 1, shift=1.0)
    current[0]["norm_p99"] = 40.0  # one case far out
    s = compare(reference, current, model="Dataset004", min_samples=20)
    assert s.verdict == "drift" and s.drifted_columns == ["norm_p99"]
    assert s.columns[0].column == "norm_p99" and not any(c.drifted for c in s.columns[1:])
    assert len(s.summary_lines) == 1 and "Normalised intensity 99th percentile" in s.summary_lines[0]
    assert "after Benjamini-Hochberg" in s.summary_lines[0] and "Benjamini-Hochberg" in s.correction
    assert s.outliers[0].case == current[0]["id"] and s.outliers[0].column == "norm_p99"
    page = render(s, reference, current)
    assert "Dataset004 - 30 current vs 120 reference cases" in page and "Benjamini-Hochberg" in page
    assert "(log scale)" in page and "<script" not in page and "http" not in page


def test_same_distribution_is_not_flagged_over_repeated_draws() -> None:
    verdicts = [compare(_rows(120, 100 + k), _rows(30, 200 + k)).verdict for k in range(20)]
    assert verdicts.count("drift") <= 2  # FDR 0.05 over 6 statistics, 20 independent re-draws
    assert verdicts.count("no drift") >= 18


def test_minimum_samples_gives_no_verdict() -> None:
    reference, shifted = _rows(120, 0), _rows(200, 1, shift=5.0)
    few = compare(reference, shifted[:8], min_samples=20)
    assert few.verdict == NOT_ENOUGH and few.drifted_columns == [] and few.dataset_drift is False
    assert "Not enough data: 8 current case(s), at least 20" in few.summary_lines[0]
    enough = compare(reference, shifted[:20], min_samples=20)
    assert enough.verdict == "drift" and "norm_p99" in enough.drifted_columns


def test_unseen_orientation_drifts() -> None:
    s = compare(_rows(120, 0), _rows(25, 1, orientation="LPS"))
    assert "orientation" in s.drifted_columns
    assert any("never seen in the reference (LPS)" in line for line in s.summary_lines)


# --- the store ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_store_one_file_per_instance_and_day(kind: str, tmp_path: Path) -> None:
    url = str(tmp_path / "store") if kind == "local" else f"memory://monitor-{tmp_path.name}"
    day1, day2 = 1_780_000_000.0, 1_780_000_000.0 + 86400
    a, b = RequestStore(url, "abc123"), RequestStore(url, "abc123")
    ids = [a.record({"norm_p99": 1.0}, now=day1), b.record({"norm_p99": 2.0}, now=day1 + 1),
           a.record({"norm_p99": 3.0}, now=day2)]  # fmt: skip
    RequestStore(url, "other-model").record({"norm_p99": 9.0}, now=day1)
    fs, root = fsspec.core.url_to_fs(url)
    files = sorted(fs.glob(f"{root}/abc123/*/*.jsonl"))
    assert len(files) == 3 and {f.rsplit("/", 2)[-2] for f in files} == {"2026-05-28", "2026-05-29"}
    rows = read_records(url, "abc123")
    assert [r["norm_p99"] for r in rows] == [1.0, 2.0, 3.0] and [r["id"] for r in rows] == ids
    assert all(set(r) == {"id", "time", "norm_p99"} for r in rows)  # statistics, a random id and the time only
    lazy = RequestStore(url, "lazy", flush_s=3600)
    lazy.record({"x": 1.0}, now=day1)
    lazy.record({"x": 2.0}, now=day1 + 5)  # within flush_s: held in memory
    assert len(read_records(url, "lazy")) == 1
    lazy.flush()
    assert len(read_records(url, "lazy")) == 2
    with pytest.raises(Exception, match="no request records for model nothing"):
        read_records(url, "nothing")
