"""Monitoring without labels: output signals and the engine's member hook, the verdict (K-S + Benjamini-Hochberg +
minimum samples), the request store (local and memory://), the reference profile, the live service, alert rules."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import httpx
import numpy as np
import pytest
import torch
import yaml

from mlops.inference.window import mirror_combinations, sliding_window_logits
from mlops.monitoring.compare import NOT_ENOUGH, benjamini_hochberg, compare
from mlops.monitoring.profile import PROFILE_NAME, model_key
from mlops.monitoring.report import render
from mlops.monitoring.signals import dice, output_signals
from mlops.monitoring.stats import normalised_stats, raw_stats
from mlops.monitoring.store import RequestStore, read_records

from .conftest import TrainedModel, run_mlops, serve_in_process

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
    (line,) = [line for line in s.summary_lines if "after Benjamini-Hochberg" in line]
    assert line.startswith("Normalised intensity 99th percentile") and "Benjamini-Hochberg" in s.correction
    assert s.outliers[0].case == current[0]["id"] and s.outliers[0].column == "norm_p99"
    assert current[0]["id"] in s.cases_out_of_range and s.summary_lines[0].startswith("Out of range:")
    page = render(s, reference, current)
    assert "Dataset004 - 30 current vs 120 reference cases" in page and "Benjamini-Hochberg" in page
    assert "Dataset Drift" in page and "shift in SD; drift: K-S p" in page  # Evidently's report, with our method


def test_same_distribution_is_not_flagged_over_repeated_draws() -> None:
    verdicts = [compare(_rows(120, 100 + k), _rows(30, 200 + k)).verdict for k in range(20)]
    assert verdicts.count("drift") <= 2  # FDR 0.05 over 6 statistics, 20 independent re-draws
    assert verdicts.count("no drift") >= 18


def test_significant_but_small_shift_is_reported_not_drift() -> None:
    """400 vs 200 cases: K-S finds a 0.5-SD move of the median; under the 1-SD floor it is a small shift, not drift.
    A subgroup (40% of the cases) moved by 3 SD barely moves the median but is drift: the size is a mean distance."""
    reference, current = _rows(400, 0), _rows(200, 1, shift=0.15)  # norm_p99 has SD 0.3
    s = compare(reference, current, min_shift_sd=1.0)
    col = next(c for c in s.columns if c.column == "norm_p99")
    assert col.score < 0.01 and col.small_shift and not col.drifted and 0.3 < col.shift_sd < 0.8, col
    assert s.verdict == "no drift" and s.drifted_columns == [] and s.small_shifts == ["norm_p99"]
    assert s.columns[0].column == "norm_p99"  # small shifts right after drifted statistics
    assert s.summary_lines[0].startswith("No statistic drifted") and len(s.summary_lines) == 2
    assert s.summary_lines[1].startswith("Small shift, not drift (under 1 SD): Normalised intensity 99th percentile")
    assert compare(reference, current, min_shift_sd=0.0).drifted_columns == ["norm_p99"]  # no floor: drift
    page = render(s, reference, current)
    assert "Small shift, not drift" in page and "at least 1 reference SD" in page
    subgroup = _rows(60, 2)
    for row in subgroup[:24]:
        row["norm_p99"] += 0.9
    s = compare(reference, subgroup, min_shift_sd=1.0)
    col = next(c for c in s.columns if c.column == "norm_p99")
    assert col.drifted and col.shift_sd >= 1.0 and s.verdict == "drift", col
    assert abs(col.current_median - col.reference_median) < 0.3  # the median moved by under 1 SD


def test_shift_and_outlier_sizes_have_a_spread_floor() -> None:
    """Issue 23: a near-constant statistic (the normalised spread is 1 for every z-scored case) gave 5e5 SD for a
    1% change, and an ``intensity_min`` of 3 against a median of 0 a robust z of 1e6."""
    rng = np.random.default_rng(0)
    reference = [{"norm_std": 1 + float(rng.normal(0, 1e-7)), "intensity_min": float(i % 20 == 0)} for i in range(170)]
    current = [{"norm_std": 0.99, "intensity_min": 3.0, "id": f"c{i}"} for i in range(30)]
    s = compare(reference, current)
    shifts = {c.column: c.shift_sd for c in s.columns}
    assert shifts["norm_std"] == pytest.approx(1.0, rel=0.01)  # 1% of the median is the floor: a 1% move is 1 SD
    assert 1 < shifts["intensity_min"] < 10 and max(o.score for o in s.outliers) < 10, (shifts, s.outliers)


def test_each_case_out_of_the_reference_range_is_an_alarm() -> None:
    """Positive statistics by a factor (1 mm everywhere allows 0.67-1.5 mm), others by half the range's width."""
    reference = [{"spacing_z": 1.0, "norm_p1": -2.0 + i / 100} for i in range(101)]  # norm_p1 in [-2, -1]
    current = [{"spacing_z": z, "norm_p1": v, "id": f"c{i}"}
               for i, (z, v) in enumerate([(1.4, -2.4), (1.6, -1.0), (0.6, -0.6), (1.0, -0.4)])]  # fmt: skip
    s = compare(reference, current, min_samples=20)
    assert s.verdict == NOT_ENOUGH and s.alarm and not s.dataset_drift
    assert [(a.case, a.column) for a in s.out_of_range] == [("c3", "norm_p1"), ("c1", "spacing_z"),
                                                             ("c2", "spacing_z")]  # fmt: skip
    limit = next(a for a in s.out_of_range if a.case == "c3")
    assert (limit.low, limit.high) == pytest.approx((-2.5, -0.5)) and "above the reference range" in limit.line
    assert compare(reference, current, range_margin=1.0).cases_out_of_range == []
    assert json.loads(s.to_json())["cases_out_of_range"] == ["c1", "c2", "c3"]


def test_bh_cutoff_decides_exactly_as_the_adjusted_p_values() -> None:
    """The Evidently report's threshold: p < cut-off exactly where the BH-adjusted p < alpha."""
    from mlops.monitoring.compare import bh_cutoff

    rng = np.random.default_rng(5)
    for k in range(200):
        p = list(rng.uniform(0, 1, 17) ** rng.uniform(1, 6))
        cutoff, adjusted = bh_cutoff(p, 0.05), benjamini_hochberg(p)
        assert [x < cutoff for x in p] == [q < 0.05 for q in adjusted], k
    assert bh_cutoff([0.5, 0.9], 0.05) == 0.0


def test_minimum_samples_gives_no_verdict() -> None:
    reference, shifted = _rows(120, 0), _rows(200, 1, shift=5.0)
    few = compare(reference, shifted[:8], min_samples=20)
    assert few.verdict == NOT_ENOUGH and few.drifted_columns == [] and few.dataset_drift is False
    assert "Not enough data: 8 current case(s), at least 20" in few.summary_lines[-1]
    assert few.alarm and len(few.cases_out_of_range) == 8  # 16 SD away: each case is an alarm on its own
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


# --- the reference profile, the CLI and the live service on a really trained model --------------------------------


def test_training_writes_the_profile(trained_synth: TrainedModel) -> None:
    """`mlops train` ended by writing the profile: every training case's inputs, the fold's validation signals."""
    profile = json.loads((trained_synth.fold_dir / PROFILE_NAME).read_text())
    assert len(profile["reference"]) == 8 and profile["folds"] == ["0"]
    assert profile["model_key"] == model_key([trained_synth.fold_dir / "checkpoint_final.pth"])
    splits_file = trained_synth.workspace.preprocessed / trained_synth.dataset / "splits_final.json"
    splits = json.loads(splits_file.read_text())
    assert sorted(r["case"] for r in profile["validation"]) == sorted(splits[0]["val"])
    row = profile["validation"][0]
    assert {"norm_p99", "norm_noise", "intensity_p99", "spacing_z", "orientation", "confidence_overall"} <= set(row)
    assert 0.5 <= row["confidence_overall"] <= 1 and 0 <= row["agreement_dice_mean"] <= 1  # TTA: 8 mirrored passes
    assert abs(profile["reference"][0]["norm_p50"]) < 3  # z-scored by nnU-Net, whatever the raw scale


def test_predict_json_has_signals(trained_synth: TrainedModel, synth_task: Path, tmp_path: Path) -> None:
    src = synth_task / "imagesTs" / "synth_008.nii.gz"
    proc = run_mlops("predict", str(src), "-o", str(tmp_path / "o.nii.gz"), "--json",
                     f"predict.model_dir={trained_synth.model_dir}", env=trained_synth.workspace.env())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    signals = json.loads(proc.stdout)[0]["signals"]
    assert 0.5 <= signals["confidence_overall"] <= 1 and 0 <= signals["agreement_dice_mean"] <= 1
    assert signals["agreement_dice_min"] <= signals["agreement_dice_mean"]
    assert set(signals) >= {"entropy_foreground", "volume_ml_Anterior", "volume_ml_Posterior"}


def test_monitor_profile_and_drift_of_test_images(
    trained_synth: TrainedModel, synth_task: Path, tmp_path: Path
) -> None:
    """`mlops monitor profile` on a copy of the model folder; `mlops drift` then compares against that profile."""
    model = tmp_path / trained_synth.model_dir.name
    shutil.copytree(trained_synth.model_dir, model, ignore=shutil.ignore_patterns(PROFILE_NAME, "*.log"))
    env = trained_synth.workspace.env()
    proc = run_mlops("monitor", "profile", "--model", str(model), "--source", str(synth_task), "predict.tta=false",
                     "monitor.profile_val_cases=1", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    profile = json.loads((model / "fold_0" / PROFILE_NAME).read_text())
    assert len(profile["reference"]) == 8 and len(profile["validation"]) == 1
    assert profile["validation"][0]["agreement_dice_mean"] is None  # no mirroring, one fold: nothing to compare
    proc = run_mlops("drift", str(synth_task), f"predict.model_dir={model}", f"paths.reports={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "drift_profile_vs_test_summary.json").read_text())
    assert summary["model"] == model.name and (summary["reference_rows"], summary["current_rows"]) == (8, 2)
    assert summary["verdict"] == "not enough data"
    assert any(c["column"] == "norm_p99" for c in summary["columns"])  # the profile's normalised statistics


@pytest.mark.real_data
def test_real_test_split_not_flagged_and_noisy_scans_are(
    trained_real: TrainedModel, hippocampus: Path, tmp_path: Path
) -> None:
    """The issue's acceptance on real scans: a profile of Task04's 170 training images against its 30 test images,
    statistics on what the network sees, gives "no drift"; the same 30 scans with Gaussian noise (10% of the
    1-99 percentile range) drift on the noise index. Output signals are left out (no validation cases predicted)."""
    import nibabel as nib

    model = tmp_path / trained_real.model_dir.name
    shutil.copytree(trained_real.model_dir, model, ignore=shutil.ignore_patterns(PROFILE_NAME, "*.log"))
    env = trained_real.workspace.env()
    proc = run_mlops("monitor", "profile", "--model", str(model), "--source", str(hippocampus),
                     "monitor.profile_val_cases=0", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(json.loads((model / "fold_0" / PROFILE_NAME).read_text())["reference"]) == 170
    noisy = tmp_path / "noisy"
    (noisy / "imagesTs").mkdir(parents=True)
    shutil.copy(hippocampus / "dataset.json", noisy)
    (noisy / "imagesTr").symlink_to(hippocampus / "imagesTr")
    (noisy / "labelsTr").symlink_to(hippocampus / "labelsTr")
    rng = np.random.default_rng(0)
    for path in sorted((hippocampus / "imagesTs").glob("*.nii.gz")):
        img = nib.load(path)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        spread = float(np.percentile(data, 99) - np.percentile(data, 1))
        noise = rng.normal(0, 0.1 * spread, data.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(data + noise, img.affine), noisy / "imagesTs" / path.name)
    summaries = {}
    for name, task in (("clean", hippocampus), ("noisy", noisy)):
        proc = run_mlops("drift", str(task), f"predict.model_dir={model}", f"paths.reports={tmp_path / name}",
                         env=env)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        summaries[name] = json.loads((tmp_path / name / "drift_profile_vs_test_summary.json").read_text())
    clean, bad = summaries["clean"], summaries["noisy"]
    assert (clean["reference_rows"], clean["current_rows"]) == (170, 30)
    assert any(c["column"] == "norm_noise" for c in clean["columns"])  # the profile's normalised statistics
    assert clean["verdict"] == "no drift", clean["summary_lines"]
    assert bad["verdict"] == "drift" and "norm_noise" in bad["drifted_columns"], bad["summary_lines"]


@pytest.fixture(scope="module")
def monitored(
    trained_synth: TrainedModel, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[tuple[str, Path]]:
    """The service (in this process) with its request store in a temporary folder and a low minimum sample size."""
    tmp = tmp_path_factory.mktemp("monitored")
    monkeypatch_module.setenv("MLOPS_DATA_DIR", str(trained_synth.workspace.root))
    store = tmp / "store"
    overrides = [f"predict.model_dir={trained_synth.model_dir}", "predict.tta=true", f"monitor.store={store}",
                 "monitor.min_samples=4", "monitor.drift_refresh_s=0.5"]  # fmt: skip
    with serve_in_process(overrides, tmp) as url:
        yield url, store


def test_service_signals_records_metrics_and_live_drift(
    monitored: tuple[str, Path], synth_task: Path, trained_synth: TrainedModel
) -> None:
    url, store = monitored
    src = synth_task / "imagesTs" / "synth_008.nii.gz"
    before = httpx.get(f"{url}/monitoring/drift", params={"format": "json"}, timeout=60).json()
    assert before["verdict"] == "not enough data" and before["current_rows"] == 0
    resp = httpx.post(f"{url}/predict", files={"file": ("jane_doe_001.nii.gz", src.read_bytes())},
                      params={"format": "json"}, timeout=120)  # fmt: skip
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert json.loads(resp.headers["x-output-signals"]) == body["signals"]
    assert 0 <= body["signals"]["agreement_dice_mean"] <= 1 and 0.5 <= body["signals"]["confidence_overall"] <= 1
    nifti = httpx.post(f"{url}/predict", files={"file": ("b.nii.gz", src.read_bytes())}, timeout=120)
    assert nifti.status_code == 200 and "confidence_foreground" in json.loads(nifti.headers["x-output-signals"])
    for _ in range(2):
        assert httpx.post(f"{url}/predict", files={"file": ("c.nii", src.read_bytes())}, timeout=120).status_code == 200
    key = model_key([trained_synth.fold_dir / "checkpoint_final.pth"])
    rows = read_records(str(store), key)
    assert len(rows) == 4 and all(len(r["id"]) == 32 for r in rows)
    text = "".join(p.read_text() for p in store.rglob("*.jsonl"))
    assert "jane_doe" not in text and ".nii" not in text and '"case"' not in text  # no file names, no identifiers
    assert {"norm_p99", "intensity_p99", "orientation", "confidence_foreground", "volume_ml_Posterior"} <= set(rows[0])
    for _ in range(60):  # the periodic refresh (every 0.5 s here) updates the gauges without a /monitoring/drift call
        if re.search(r"mlops_drift_current_samples 4\.0", httpx.get(f"{url}/metrics", timeout=10).text):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the drift gauges were not refreshed within 30 s (monitor.drift_refresh_s=0.5)")
    page = httpx.get(f"{url}/monitoring/drift", timeout=60)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f"{trained_synth.model_dir.name} - 4 current vs 8 reference cases" in page.text
    assert "Benjamini-Hochberg" in page.text and "Verdict:" in page.text and "Dataset Drift" in page.text  # Evidently
    summary = httpx.get(f"{url}/monitoring/drift", params={"format": "json"}, timeout=60).json()
    assert summary["current_rows"] == 4 and summary["verdict"] in ("drift", "no drift")
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert re.search(r'mlops_prediction_confidence_count\{region="foreground"\} 4\.0', metrics)
    assert re.search(r"mlops_prediction_agreement_dice_count 4\.0", metrics)
    assert re.search(r'mlops_prediction_volume_ml_count\{label="Posterior"\} 4\.0', metrics)
    assert re.search(r"mlops_drift_current_samples 4\.0", metrics)
    assert re.search(r"mlops_drift_cases_out_of_range 0\.0", metrics)  # the session's own test scans: in range
    check_alert_rules(metrics)


# --- alerting as code -----------------------------------------------------------------------------------------------

PROMQL_WORDS = {"by", "without", "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
PROMQL_FUNCTIONS = {"sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile", "clamp_min", "abs"}


def promql_references(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(metric selectors with their matcher label names, grouping label names) of a PromQL expression.

    A parse check, not Prometheus's parser (no promtool wheel exists on PyPI): balanced brackets, known functions,
    valid regex matchers, and every identifier classified as function, keyword, metric or label."""
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    assert re.search(r"(>|<|>=|<=|==|!=)\s*[0-9.e-]+\s*($|and|or|unless)", expr), f"no threshold comparison: {expr}"
    grouping: set[str] = set()
    for m in re.finditer(r"\b(by|without)\s*\(([^)]*)\)", expr):
        grouping |= {g.strip() for g in m.group(2).split(",") if g.strip()}
    stripped = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", expr)
    stripped = re.sub(r"\[[0-9]+[smhd]\]", " ", stripped)
    selectors = []
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\s*(\{([^}]*)\})?\s*(\()?", stripped):
        name, matchers, call = m.group(1), m.group(3), m.group(4)
        if call:
            assert name in PROMQL_FUNCTIONS, f"unknown function {name} in {expr}"
            continue
        if name in PROMQL_WORDS or re.fullmatch(r"[0-9.e]+", name):
            continue
        labels = set()
        for lm in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers or ""):
            labels.add(lm.group(1))
            if lm.group(2) in ("=~", "!~"):
                re.compile(lm.group(3))
        selectors.append((name, labels))
    return selectors, grouping


def scraped_families(metrics: str) -> dict[str, set[str]]:
    """Series names a real /metrics exposes (histogram _bucket/_count/_sum, counter _total) -> their label names.
    Families come from the HELP/TYPE lines, so a labelled counter with no series yet (e.g. a 5xx) still counts."""
    from prometheus_client.parser import text_string_to_metric_families

    names: dict[str, set[str]] = {}
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "gauge": ("",)}
    for fam in text_string_to_metric_families(metrics):
        labels = set().union(*(set(s.labels) for s in fam.samples)) if fam.samples else set()
        for suffix in suffixes.get(fam.type, ("",)):
            names[fam.name + suffix] = {lab for lab in labels if suffix == "_bucket" or lab != "le"}
    return names


def alert_expressions() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "mlops-alerts.yaml").read_text())["groups"][0]["rules"]
    return {r["alert"]: " ".join(r["expr"].split()) for r in rules}


def check_alert_rules(metrics: str) -> None:
    families = scraped_families(metrics)
    try:  # Prometheus's grammar (a Rust port, PyPI promql-parser) where installed; the checks below run regardless
        import promql_parser
    except ImportError:
        promql_parser = None
    for alert, expr in alert_expressions().items():
        if promql_parser is not None:
            promql_parser.parse(expr)
        selectors, grouping = promql_references(expr)
        assert selectors, alert
        for name, labels in selectors:
            assert name in families, f"{alert}: {name} is not a metric the service exposes"
            assert labels <= families[name], f"{alert}: {name} has no label(s) {labels - families[name]}"
        assert grouping <= set().union(*(families[n] for n, _ in selectors)), f"{alert}: grouping {grouping}"


def test_alert_rules_and_cloud_policies_agree() -> None:
    """Five alerts (errors, latency, confidence, drift, a case out of range), each with the equivalent Cloud
    Monitoring policy."""
    rules = alert_expressions()
    assert set(rules) == {"MlopsPredictErrorRate", "MlopsPredictLatencyHigh", "MlopsLowConfidence", "MlopsInputDrift",
                          "MlopsInputOutOfRange"}  # fmt: skip
    policies = {p.name: json.loads(p.read_text()) for p in (DEPLOY / "cloud-monitoring").glob("*.json")}
    assert len(policies) == len(rules)
    for policy in policies.values():
        condition = policy["conditions"][0]["conditionPrometheusQueryLanguage"]
        assert condition["query"] == rules[policy["displayName"]]
        assert re.fullmatch(r"[0-9]+s", condition["duration"]) and policy["combiner"] == "OR"
    with pytest.raises(AssertionError, match="no threshold"):
        promql_references("sum(rate(mlops_http_requests_total[5m]))")
    with pytest.raises(AssertionError, match="unknown function"):
        promql_references("sum(rat(mlops_http_requests_total[5m])) > 1")
