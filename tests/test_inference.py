"""The inference engine: our sliding window gives nnU-Net's answer; exports, backends and precisions; cancellation.

The reference is nnU-Net's own ``nnUNetPredictor`` (``predict.backend=nnunet``) on the same loaded weights.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from loguru import logger
from scipy import ndimage

from mlops import nnunet
from mlops.errors import Cancelled, PipelineError
from mlops.inference import Segmenter
from mlops.inference.backends import cpu_has_bf16, openvino_has_bf16
from mlops.inference.record import CHECK_NAME

from .conftest import TrainedModel, run_mlops
from .parity import assert_same_labels, top_two_gap


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total


def load_cases(folder: Path) -> list[tuple[str, np.ndarray, tuple[float, ...]]]:
    cases = []
    for path in sorted(folder.glob("*.nii.gz")):
        img = nib.load(path)
        cases.append((path.name, np.asanyarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])))
    return cases


@pytest.fixture(scope="module")
def exported(trained_synth: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the synthetic model with ONNX + OpenVINO exports, written by the real `mlops export`."""
    model = tmp_path_factory.mktemp("exported") / trained_synth.model_dir.name
    shutil.copytree(trained_synth.model_dir, model)
    proc = run_mlops("export", "--model", str(model), env=trained_synth.workspace.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    stamp = json.loads((model / "fold_0" / "export" / "export.json").read_text())
    assert stamp["formats"] == ["onnx", "openvino"] and len(stamp["checkpoint_sha256"]) == 64
    return model


@pytest.fixture(scope="module")
def reference(trained_synth: TrainedModel) -> Segmenter:
    return Segmenter(trained_synth.model_dir, backend="nnunet", device="cpu")


@pytest.fixture(scope="module")
def expected(reference: Segmenter) -> Callable[..., tuple[np.ndarray, torch.Tensor, np.ndarray]]:
    """nnU-Net's labels, logits and top-two probability gap (tests/parity.py) for a case, computed once per case and
    mirroring setting (the slow part)."""
    cache: dict[tuple[str, bool], tuple[np.ndarray, torch.Tensor, np.ndarray]] = {}

    def run(name: str, data: np.ndarray, spacing: tuple[float, ...], tta: bool = True) -> tuple[np.ndarray, Any, Any]:
        if (name, tta) not in cache:
            prepared = reference.prepare(data, spacing)
            logits = reference.logits(prepared, tta)
            labels, probabilities = reference.finish_with_probabilities(prepared, logits)
            cache[name, tta] = labels, logits.float(), top_two_gap(probabilities)
        return cache[name, tta]

    return run


@pytest.fixture(scope="module")
def synth_cases(synth_task: Path) -> list[tuple[str, np.ndarray, tuple[float, ...]]]:
    """The synthetic test cases, plus one enlarged 1.6x at the same spacing (a wider field of view): many tiles."""
    cases = load_cases(synth_task / "imagesTs")
    name, data, spacing = cases[0]
    big = ndimage.zoom(data.astype(np.float32), (1.6, 1.6, 1.6), order=1)
    return [*cases, ("big_" + name, big, spacing)]


def tile_coverage(seg: Segmenter, prepared: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Number of tiles and the summed Gaussian weight per voxel of nnU-Net's sliding window over ``prepared``."""
    patch = seg.model.patch_size
    padded, revert = nnunet.pad_to_patch(prepared, patch)
    starts = nnunet.tile_starts(tuple(padded.shape[1:]), patch, seg.tile_step_size)
    gaussian = nnunet.gaussian_weights(patch, torch.device("cpu"))
    weights = torch.zeros(padded.shape[1:])
    corners = list(itertools.product(*starts))
    for corner in corners:
        weights[tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))] += gaussian
    return len(corners), weights[revert[1:]]


# Mirroring on the many-tile case is the default tier's longest test (70-86 s): it runs in the slow tier, where the
# real-scan parity also mirrors; the default tier keeps the many-tile case without mirroring.
@pytest.mark.parametrize("tta", [pytest.param(True, marks=pytest.mark.slow), False], ids=["mirroring", "no-mirroring"])
def test_fp32_torch_gives_nnunet_labels(
    trained_synth: TrainedModel, expected: Callable, synth_cases: list, tta: bool
) -> None:
    """Same labels voxel for voxel on single-tile cases; on many tiles, equal up to nnU-Net's own float16 rounding.

    nnU-Net sums Gaussian-weighted tiles into a float16 array even on CPU; we sum in float32. Where a tile's Gaussian
    weight is tiny (its rim), float16 products lose most of their bits (subnormals), so nnU-Net's logits there are
    off by up to about 0.3 and can flip a near-tied voxel. So on the many-tile case the logits must agree to float16
    precision wherever the summed weight is at least 0.01 (of a peak of 10), and labels may differ only at near ties
    (tests/parity.py). Every real hippocampus scan fits in one tile: there the labels must be identical.
    """
    ours = Segmenter(trained_synth.model_dir, backend="torch", precision="fp32", device="cpu", max_batch=32)
    assert (ours.backend, ours.precision) == ("torch", "fp32")
    most_tiles = 0
    for name, data, spacing in synth_cases:
        theirs_labels, theirs, gap = expected(name, data, spacing, tta)
        assert (theirs_labels > 0).any(), f"{name}: the reference segments nothing; the comparison would be empty"
        prepared = ours.prepare(data, spacing)
        tiles, weights = tile_coverage(ours, prepared.data)
        most_tiles = max(most_tiles, tiles)
        if tiles == 1:
            got = ours.segment(data, spacing, tta=tta)
            assert got.shape == data.shape and got.dtype == np.uint8
            np.testing.assert_array_equal(got, theirs_labels, err_msg=name)
            continue
        mine = ours.logits(prepared, tta)  # segment() is prepare, logits, finish: run once, not twice, on many tiles
        got = ours.finish(prepared, mine)
        assert got.shape == data.shape and got.dtype == np.uint8
        well_covered = (weights >= 0.01).expand_as(mine)
        assert well_covered.float().mean() > 0.5, (name, float(well_covered.float().mean()))
        diff = (theirs - mine).abs()[well_covered]
        assert float(diff.max()) <= 4e-3 * float(mine.abs().max()), (name, float(diff.max()))
        assert_same_labels(got, theirs_labels, gap, "fp32", name)
    assert most_tiles > 4, "the big case must span several tiles"


@pytest.mark.parametrize(
    ("backend", "precision"),
    [("openvino", "fp32"), ("onnxruntime", "fp32"), ("openvino", "bf16"), ("torch", "bf16")],
)
def test_exported_backends_agree_with_nnunet(
    exported: Path, expected: Callable, synth_cases: list, backend: str, precision: str
) -> None:
    """Every export gives nnU-Net's labels but at near ties (tests/parity.py: fp32 and bf16 margins); bf16 keeps 8
    bits of mantissa, so on this briefly trained model it may flip more voxels where the model is unsure (CI saw Dice
    0.982 on the big case's 750-voxel label), all near ties. Whether bf16 is good enough for a model is the parity
    check's call (Dice >= 0.99), which `auto` follows (test_auto_picks_the_fastest_combination_that_passed); on the
    real model it passes (test_real_test_scans_parity, bench_predict: min Dice 0.998)."""
    if precision == "bf16" and not (openvino_has_bf16() if backend == "openvino" else cpu_has_bf16()):
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is refused (test_bf16_refused_without_it)")
    ours = Segmenter(exported, backend=backend, precision=precision, device="cpu")
    for name, data, spacing in synth_cases:
        theirs, _, gap = expected(name, data, spacing)
        assert_same_labels(ours.segment(data, spacing), theirs, gap, precision, f"{name} {backend} {precision}")


def test_export_checks_every_combination_against_nnunet(exported: Path) -> None:
    """`mlops export` ran the parity check on the fold's validation cases: every combination this CPU runs natively,
    scored against nnU-Net's own predictor and timed, in the model folder under the checkpoint's hash."""
    from mlops.inference.export import weights_sha256

    (entry,) = json.loads((exported / CHECK_NAME).read_text())["checks"]
    assert entry["weights_sha256"] == weights_sha256([exported / "fold_0" / "checkpoint_final.pth"])
    assert 1 <= len(entry["cases"]) <= 4 and entry["tta"] is True and entry["nnunet_seconds_per_case"] > 0
    combos = {(r["backend"], r["precision"]): r for r in entry["results"]}
    expected_combos = {("torch", "fp32"), ("openvino", "fp32"), ("onnxruntime", "fp32")}
    expected_combos |= {("torch", "bf16")} if cpu_has_bf16() else set()
    expected_combos |= {("openvino", "bf16")} if openvino_has_bf16() else set()
    assert set(combos) == expected_combos
    for key in (("torch", "fp32"), ("openvino", "fp32"), ("onnxruntime", "fp32")):
        r = combos[key]  # fp32 gives nnU-Net's labels on the synthetic cases (test_fp32_torch_gives_nnunet_labels)
        assert r["passed"] and r["min_dice"] >= 0.99 and r["mean_dice"] >= 0.995 and r["seconds_per_case"] > 0, r
        assert r["speed_vs_nnunet"] == pytest.approx(r["seconds_per_case"] / entry["nnunet_seconds_per_case"], 0.01)


def test_check_images_and_a_bad_folder(exported: Path, trained_synth: TrainedModel, tmp_path: Path) -> None:
    """--check-images takes one file per case (nnU-Net's case_0000 when channels are split), spread evenly; a path
    that is no folder fails before anything is exported, naming it (the export and its check stay as they were)."""
    from mlops.inference.check import check_images

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        for c in range(2):
            (folder / f"case_{i:03d}_{c:04d}.nii.gz").touch()
    (folder / "notes.txt").touch()
    picked = check_images(None, exported, 0, 4, folder)
    assert [p.name for p in picked] == [f"case_{i:03d}_0000.nii.gz" for i in (0, 2, 5, 7)]
    before = {p: p.stat().st_mtime_ns for p in (exported / "fold_0" / "export").iterdir()}
    proc = run_mlops("export", "--model", str(exported), "--check-images", str(tmp_path / "missing"),
                     env=trained_synth.workspace.env())  # fmt: skip
    assert proc.returncode == 1 and f"{tmp_path / 'missing'}: not a folder" in proc.stderr, proc.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (exported / "fold_0" / "export").iterdir()} == before


def with_check(model: Path, tmp_path: Path, edit: Callable[[list[dict]], None]) -> Path:
    """A copy of ``model`` whose parity check's results were edited by ``edit`` (to choose between on purpose)."""
    copy = tmp_path / model.name
    shutil.copytree(model, copy)
    data = json.loads((copy / CHECK_NAME).read_text())
    edit(data["checks"][0]["results"])
    (copy / CHECK_NAME).write_text(json.dumps(data))
    return copy


def test_auto_picks_the_fastest_combination_that_passed(
    exported: Path, trained_synth: TrainedModel, tmp_path: Path
) -> None:
    def auto(model: Path) -> tuple[str, str]:
        seg = Segmenter(model, device="cpu")
        return seg.backend, seg.precision

    def times(order: list[tuple[str, str]], failed: tuple[str, str] | None = None) -> Callable[[list[dict]], None]:
        def edit(results: list[dict]) -> None:
            for r in results:
                key = (r["backend"], r["precision"])
                r["seconds_per_case"] = order.index(key) + 1.0 if key in order else 99.0
                r["passed"] = key != failed

        return edit

    ort, ov, tfp = ("onnxruntime", "fp32"), ("openvino", "fp32"), ("torch", "fp32")
    assert auto(with_check(exported, tmp_path / "a", times([ort, ov, tfp]))) == ort
    assert auto(with_check(exported, tmp_path / "b", times([ort, ov, tfp], failed=ort))) == ov  # never unchecked
    # An explicit backend with `auto` precision takes that backend's fastest passed precision.
    seg = Segmenter(
        with_check(exported, tmp_path / "c", times([ort, ("torch", "bf16"), tfp])), backend="torch", device="cpu"
    )
    assert (seg.backend, seg.precision) == ("torch", "bf16" if cpu_has_bf16() else "fp32")
    if cpu_has_bf16() and openvino_has_bf16():
        ovb = ("openvino", "bf16")
        assert auto(with_check(exported, tmp_path / "d", times([ovb, ov]))) == ovb
        assert auto(with_check(exported, tmp_path / "e", times([ovb, ov], failed=ovb))) == ov
    # A check made with other weights (a retrained checkpoint) is not this model's: fp32 OpenVINO, as unchecked.
    stale = with_check(exported, tmp_path / "f", times([ort, ov, tfp]))
    data = json.loads((stale / CHECK_NAME).read_text())
    data["checks"][0]["weights_sha256"] = "0" * 64
    (stale / CHECK_NAME).write_text(json.dumps(data))
    assert auto(stale) == ov
    unchecked = tmp_path / "g" / exported.name
    shutil.copytree(exported, unchecked)
    (unchecked / CHECK_NAME).unlink()
    assert auto(unchecked) == ov
    assert auto(trained_synth.model_dir) == tfp  # no export: PyTorch


def test_a_combination_that_failed_the_check_warns_when_asked_for(exported: Path, tmp_path: Path) -> None:
    def fail_onnx(results: list[dict]) -> None:
        for r in results:
            r["passed"] = r["backend"] != "onnxruntime"

    model = with_check(exported, tmp_path, fail_onnx)
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        seg = Segmenter(model, backend="onnxruntime", precision="fp32", device="cpu")
    finally:
        logger.remove(sink)
    assert seg.backend == "onnxruntime"
    assert any("did not pass this model's parity check" in m for m in messages), messages


def test_missing_and_stale_exports_are_explained(
    exported: Path, trained_synth: TrainedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(PipelineError, match=r"no openvino export .*\(run `mlops export`\)"):
        Segmenter(trained_synth.model_dir, backend="openvino", device="cpu")
    stale = tmp_path / exported.name
    shutil.copytree(exported, stale)
    stamp_file = stale / "fold_0" / "export" / "export.json"
    stamp = json.loads(stamp_file.read_text())
    stamp["checkpoint_sha256"] = "0" * 64  # as if checkpoint_final.pth had been retrained after the export
    stamp_file.write_text(json.dumps(stamp))
    with pytest.raises(PipelineError, match="stale export"):
        Segmenter(stale, backend="openvino", device="cpu")
    assert Segmenter(stale, device="cpu").backend == "torch"  # auto falls back, and says why (logged)


@pytest.mark.parametrize(
    ("backend", "precision", "message"),
    [("tensorrt", "fp32", "choose one of"), ("torch", "fp8", "choose one of"), ("torch", "fp16", "needs a CUDA")],
)
def test_invalid_choices(trained_synth: TrainedModel, backend: str, precision: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        Segmenter(trained_synth.model_dir, backend=backend, precision=precision, device="cpu")


def test_cancel_stops_between_tiles(trained_synth: TrainedModel, synth_cases: list) -> None:
    seg = Segmenter(trained_synth.model_dir, backend="torch", device="cpu", max_batch=8)
    _, data, spacing = synth_cases[-1]
    polls: list[int] = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) >= 3  # let two passes run, stop at the third

    with pytest.raises(Cancelled):
        seg.segment(data, spacing, cancel=cancel)
    assert len(polls) == 3
    assert seg.segment(data, spacing, tta=False).shape == data.shape  # the segmenter is still usable afterwards


def test_bf16_refused_without_native_support(exported: Path) -> None:
    """Emulated bf16 took 184 s for one patch here (fp32: ~0.2 s): refuse it with the reason instead."""
    for backend, native in (("torch", cpu_has_bf16()), ("openvino", openvino_has_bf16())):
        if native:
            assert Segmenter(exported, backend=backend, precision="bf16", device="cpu").precision == "bf16"
        else:
            with pytest.raises(PipelineError, match="no native bf16"):
                Segmenter(exported, backend=backend, precision="bf16", device="cpu")


@pytest.mark.slow
@pytest.mark.real_data
def test_real_test_scans_parity(trained_real: TrainedModel, hippocampus: Path, tmp_path: Path) -> None:
    """On every other real test scan (15 of the 30), with mirroring: torch fp32 and every other backend `auto` may
    pick here give nnU-Net's labels but at near ties (tests/parity.py), and per-label Dice >= 0.995 on average.
    (`benchmarks/bench_predict.py` prints every backend's parity on all 30 scans; the test takes half: nnU-Net's own
    predictor, the reference, costs 3.3 s per scan here.)"""
    model = tmp_path / trained_real.model_dir.name
    shutil.copytree(trained_real.model_dir, model)
    proc = run_mlops("export", "--model", str(model), env=trained_real.workspace.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = Segmenter(model, backend="nnunet", device="cpu")
    auto = Segmenter(model, device="cpu")  # what auto picks here
    candidates = {f"{auto.backend} {auto.precision}": auto}
    for backend in ("torch", "openvino", "onnxruntime"):
        if f"{backend} fp32" not in candidates:
            candidates[f"{backend} fp32"] = Segmenter(model, backend=backend, precision="fp32", device="cpu")
    cases = load_cases(hippocampus / "imagesTs")
    assert len(cases) == 30
    cases = cases[::2]
    scores: dict[str, list[float]] = {k: [] for k in candidates}
    segmented = 0
    for name, data, spacing in cases:
        prepared = reference.prepare(data, spacing)
        theirs, probabilities = reference.finish_with_probabilities(prepared, reference.logits(prepared))
        gap = top_two_gap(probabilities)
        segmented += int(all((theirs == label).any() for label in reference.labels))
        for key, seg in candidates.items():
            got = seg.segment(data, spacing)
            assert_same_labels(got, theirs, gap, seg.precision, f"{name} {key}")
            scores[key].extend(dice(got, theirs, label) for label in seg.labels if label)
    assert segmented >= 12, "the model must find both labels in most scans, or the comparison says little"
    for key, values in scores.items():
        assert len(values) == 2 * len(cases) and float(np.mean(values)) >= 0.995, (key, float(np.mean(values)))
