"""nnU-Net's full experiment through `mlops`: --dataset, fold lists, the exact resume command, warnings,
nnU-Net's validation re-run, find-best with post-processing that predict then applies."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from mlops.config import config_dir, load_config
from mlops.datasets import dataset_overrides
from mlops.errors import ConfigError
from mlops.evaluate import DiceReport, model_validation_warnings, weak_labels
from mlops.train import estimate_cpu_seconds
from mlops.workspace import parse_folds, prepared_dataset

from . import models
from .conftest import QUICK_TRAIN, TrainedModel, Workspace, mlops_process, run_mlops

MODEL = "nnUNetTrainer__nnUNetPlans__3d_fullres"
QUICK = [o for o in QUICK_TRAIN if not o.startswith("dataset.")] + ["wandb.mode=disabled"]


def _private(prepared: Workspace, root: Path) -> Workspace:
    """A copy of the prepared synthetic dataset with results of its own (the session's folds stay untouched)."""
    return Workspace(models.private_copy(prepared.root, root / "data"))


@pytest.mark.parametrize("value", ["500", "Dataset500_Synthetic", "Synthetic", "synthetic", "SYNTHETIC"])
def test_dataset_by_id_folder_name_or_group(
    value: str, prepared_synth: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS_DATA_DIR", str(prepared_synth.root))
    base = load_config()  # the default dataset is hippocampus (id 4), not prepared here
    cfg = load_config(dataset_overrides(value, base, [], config_dir()))
    from mlops.workspace import export_paths

    export_paths(cfg)
    identity, pre_dir = prepared_dataset(cfg)
    assert identity.folder == "Dataset500_Synthetic" and pre_dir == prepared_synth.preprocessed / identity.folder
    assert cfg.dataset.source.endswith("Task500_Synthetic")  # the config group came along (prepare finds its source)


def test_dataset_errors_name_what_exists(prepared_synth: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_DATA_DIR", str(prepared_synth.root))
    base = load_config()
    with pytest.raises(ConfigError, match=r"'Nope': no such dataset.*Dataset500_Synthetic \(id 500\)"):
        dataset_overrides("Nope", base, [], config_dir())
    with pytest.raises(ConfigError, match=r"looks like a device.*-D/--device"):
        dataset_overrides("cpu", base, [], config_dir())
    proc = run_mlops("train", "-d", "7", "--fold", "0", env=prepared_synth.env())
    assert proc.returncode == 1
    assert "Dataset007_" in proc.stderr and "prepared datasets: Dataset500_Synthetic (--dataset 500)" in proc.stderr


def test_predict_without_a_model_names_the_trained_one(
    trained_synth: TrainedModel, synth_task: Path, tmp_path: Path
) -> None:
    """After `make demo` (synthetic model only), a plain `mlops predict` says which model exists and how to pick it."""
    ws = trained_synth.workspace
    image = synth_task / "imagesTs" / "synth_008.nii.gz"
    proc = run_mlops("predict", str(image), "-o", str(tmp_path / "x.nii.gz"), env=ws.env())
    assert proc.returncode == 1
    assert "no trained model in" in proc.stderr and "Dataset004_Hippocampus" in proc.stderr
    assert "trained models: Dataset500_Synthetic 3d_fullres folds 0" in proc.stderr and "--dataset 500" in proc.stderr
    assert not (tmp_path / "x.nii.gz").exists()
    ok = run_mlops("predict", str(image), "-d", "500", "--no-tta", "-o", str(tmp_path / "x.nii.gz"), env=ws.env())
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert nib.load(tmp_path / "x.nii.gz").shape == nib.load(image).shape


def test_fold_lists() -> None:
    assert parse_folds("0") == [0]
    assert parse_folds("all") == ["all"]
    assert parse_folds("0,1, 2") == [0, 1, 2]
    assert parse_folds("0-4") == [0, 1, 2, 3, 4]
    with pytest.raises(Exception, match="unknown fold '5'"):
        parse_folds("0,5")
    with pytest.raises(Exception, match="listed twice"):
        parse_folds("1,1")


@pytest.mark.slow  # two folds trained around an interrupt: about a minute; the hint's text is in the default tier
def test_resume_hint_executed_as_printed_resumes_the_run(
    prepared_synth: Workspace, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Interrupt fold 2 of `--fold 2,3` (by dataset name); the printed command resumes fold 2, then trains fold 3."""
    ws = _private(prepared_synth, tmp_path_factory.mktemp("hint"))
    fast = ["train=quick", "train.epochs=3", "train.iterations_per_epoch=2", "train.val_iterations_per_epoch=1"]
    fast += ["train.validate=false", "train.num_workers=0", "wandb.mode=disabled"]
    fold2 = ws.results / "Dataset500_Synthetic" / MODEL / "fold_2"
    with mlops_process("train", "--dataset", "Synthetic", "--fold", "2,3", "-D", "cpu", *fast, env=ws.env()) as proc:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (fold2 / "mlops_train.log").is_file() and "Epoch 1/3" in (fold2 / "mlops_train.log").read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    (line,) = re.findall(r"Resume with: (.+)", stderr)
    words = shlex.split(line)
    assert words[:2] == ["mlops", "train"] and words[-1] == "--continue", line
    assert "--dataset Dataset500_Synthetic --fold 2,3 --device cpu" in shlex.join(words)
    assert all(o in words for o in fast)  # the schedule overrides, as given
    interrupted_at = torch.load(fold2 / "checkpoint_latest.pth", weights_only=False)["current_epoch"]
    assert 1 <= interrupted_at < 3
    resumed = run_mlops(*words[1:], env=ws.env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from checkpoint_latest.pth at epoch {interrupted_at}/3" in resumed.stderr
    for fold in (2, 3):
        ckpt = torch.load(fold2.with_name(f"fold_{fold}") / "checkpoint_final.pth", weights_only=False)
        assert ckpt["current_epoch"] == 3 and len(ckpt["logging"]["train_losses"]) == 3, fold
    again = run_mlops(*words[1:], env=ws.env())  # both folds finished: nothing left to train
    assert again.returncode == 0 and again.stderr.count("already finished its 3 epochs") == 2, again.stderr[-2000:]


def test_cpu_duration_estimate_of_the_full_schedule(prepared_synth: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_DATA_DIR", str(prepared_synth.root))
    pre = prepared_synth.preprocessed / "Dataset500_Synthetic"
    full, _, patch = estimate_cpu_seconds(pre, load_config(["dataset=synthetic"]))
    cpu, batch, _ = estimate_cpu_seconds(pre, load_config(["dataset=synthetic", "train=cpu"]))
    assert batch == 6 and len(patch) == 3
    assert full / cpu == pytest.approx((1000 * (250 + 16)) / (12 * (50 + 3)) * (2 / 6), rel=0.3)
    assert full > 24 * 3600  # days on a CPU: the warning fires (it needs more than 2 hours)


def test_full_schedule_on_cpu_warns_with_its_duration(prepared_synth: Workspace, tmp_path: Path) -> None:
    """nnU-Net's default schedule started on the CPU warns with its duration (the run is stopped right after)."""
    ws = _private(prepared_synth, tmp_path)
    args = ["train", "-d", "500", "--fold", "0", "-D", "cpu", "wandb.mode=disabled", "train.num_workers=0"]
    # mlops_process kills it whatever happens: a failed run of this test once left the 1000-epoch run going for 80 min
    with mlops_process(*args, env=ws.env()) as proc:
        deadline, seen = time.monotonic() + 600, ""  # ends at the warning (seconds); the bound is for a loaded machine
        log = ws.results / "Dataset500_Synthetic" / MODEL / "fold_0" / "mlops_train.log"
        while time.monotonic() < deadline and proc.poll() is None:
            seen = log.read_text() if log.is_file() else ""
            if "on a CPU take about" in seen:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=600)
    assert "1000 epochs x 250 iterations" in stderr and "on a CPU take about" in stderr, stderr[-2000:]
    assert " days here" in stderr and "train=cpu" in stderr


def test_near_zero_dice_warnings(trained_synth: TrainedModel, tmp_path: Path) -> None:
    report = DiceReport("s", {"1": "Anterior", "2": "Posterior"}, 2, {"Anterior": 0.8, "Posterior": 0.01}, 0.4, [])
    assert weak_labels(report) == {"Posterior": 0.01}
    model = tmp_path / MODEL
    shutil.copytree(trained_synth.model_dir, model, ignore=shutil.ignore_patterns("*.pth", "wandb"))
    assert model_validation_warnings(model, [0]) == []  # the session's model learned both labels
    summary = model / "fold_0" / "validation" / "summary.json"
    data = json.loads(summary.read_text())
    for row in data["metric_per_case"]:
        row["metrics"]["2"]["Dice"] = 0.0  # what a 6-minute run on the real task gave: an all-background label
    summary.write_text(json.dumps(data))
    (warning,) = model_validation_warnings(model, [0])
    assert "fold 0" in warning and "Posterior 0.000" in warning and "Anterior" not in warning


@pytest.fixture(scope="module")
def two_folds(prepared_synth: Workspace, trained_synth: TrainedModel, tmp_path_factory: pytest.TempPathFactory):
    """Folds 0 and 1 through `mlops train --fold 0,1 --continue`: fold 0 is the session's model (already finished,
    so it is not retrained), fold 1 is trained here with the same quick schedule."""
    ws = _private(prepared_synth, tmp_path_factory.mktemp("experiment"))
    dst = ws.results / "Dataset500_Synthetic" / MODEL
    shutil.copytree(trained_synth.model_dir, dst, ignore=shutil.ignore_patterns("wandb", "previous_runs", "fold_[1-4]"))
    proc = run_mlops("train", "--dataset", "500", "--fold", "0,1", "--continue", *QUICK, env=ws.env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ws, proc


@pytest.mark.slow  # a full pipeline (a second fold trained, validation re-run, find-best, predict): about 2.5 minutes
def test_two_folds_then_validate_find_best_and_post_processed_predict(
    two_folds: tuple[Workspace, subprocess.CompletedProcess], synth_task: Path, tmp_path: Path
) -> None:
    ws, train = two_folds
    model = ws.results / "Dataset500_Synthetic" / MODEL
    assert "already finished its 4 epochs" in train.stderr  # fold 0: resumable on its own, nothing to redo
    assert torch.load(model / "fold_1" / "checkpoint_final.pth", weights_only=False)["current_epoch"] == 4
    assert "Trained folds 0,1" in train.stdout

    # nnU-Net's validation re-run on both folds (as after train.validate=false)
    for fold in (0, 1):
        (model / f"fold_{fold}" / "validation" / "summary.json").unlink()
    val = run_mlops("validate", "-d", "Dataset500_Synthetic", "--fold", "0,1", "-D", "cpu", env=ws.env())
    assert val.returncode == 0, val.stderr[-3000:]
    assert all((model / f"fold_{f}" / "validation" / "summary.json").is_file() for f in (0, 1))
    assert "Fold 0: 2 validation cases" in val.stdout and "Fold 1: 2 validation cases" in val.stdout

    # A spurious speck in each validation prediction: the situation nnU-Net's post-processing exists for.
    for pred in sorted(model.glob("fold_[01]/validation/*.nii.gz")):
        img = nib.load(pred)
        seg = np.asarray(img.dataobj).copy()
        assert (seg == 1).any()
        seg[:3, :3, :3] = 1
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), img.affine, img.header), pred)

    best = run_mlops("find-best", "-d", "500", "--folds", "0,1", env=ws.env())
    assert best.returncode == 0, best.stderr[-3000:]
    choice = json.loads((ws.results / "Dataset500_Synthetic" / "mlops_best.json").read_text())
    assert choice["folds"] == [0, 1] and Path(choice["model_dirs"][0]).name == MODEL
    assert Path(choice["postprocessing"]).is_file() and choice["postprocessing_steps"], choice
    assert choice["dice_after_pp"] > choice["dice_before_pp"]
    assert (ws.results / "Dataset500_Synthetic" / "inference_instructions.txt").is_file()
    assert "remove_all_but_largest_component" in best.stdout and "labels_or_regions=" in best.stdout

    # An input with a second, smaller bright structure where the training data never had one.
    src = synth_task / "imagesTs" / "synth_008.nii.gz"
    img = nib.load(src)
    data = np.asarray(img.dataobj, dtype=np.float32).copy()
    ref = np.asarray(nib.load(synth_task.with_name(synth_task.name + "_labelsTs") / src.name).dataobj)
    data[1:8, 18:25, 1:8] = data[ref == 1].mean()
    crafted = tmp_path / "crafted.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), crafted)

    raw_out = str(tmp_path / "raw.nii.gz")  # the same folds chosen by hand: find-best's post-processing is off
    raw = run_mlops("predict", str(crafted), "-d", "500", "--folds", "0,1", "--no-tta", "-o", raw_out,
                    "--save-probabilities", env=ws.env())  # fmt: skip
    assert raw.returncode == 0, raw.stderr[-3000:]
    pp = run_mlops(
        "predict", str(crafted), "-d", "Synthetic", "--no-tta", "-o", str(tmp_path / "pp.nii.gz"), env=ws.env()
    )
    assert pp.returncode == 0, pp.stderr[-3000:]
    assert "find-best's choice: folds [0, 1]" in pp.stderr
    before = np.asarray(nib.load(tmp_path / "raw.nii.gz").dataobj)
    after = np.asarray(nib.load(tmp_path / "pp.nii.gz").dataobj)
    probs = np.load(tmp_path / "raw.npz")["probabilities"]  # nnU-Net's layout: classes, z, y, x
    assert probs.shape == (3, *before.shape[::-1]) and np.allclose(probs.sum(axis=0), 1, atol=1e-3)
    assert (probs.argmax(axis=0).transpose(2, 1, 0) == before).mean() > 0.999
    assert (tmp_path / "raw.pkl").is_file()
    blob = (slice(1, 8), slice(18, 25), slice(1, 8))
    assert (before[blob] > 0).any(), "the crafted structure was not segmented: the assertions below could not fail"
    changed = before != after
    assert changed.any() and (after[changed] == 0).all()  # post-processing only removes voxels
    assert not (after[blob] > 0).any()  # the spurious component is gone
    _, n_before = ndimage.label(before > 0, structure=np.ones((3, 3, 3)))
    _, n_after = ndimage.label(after > 0, structure=np.ones((3, 3, 3)))
    assert n_after < n_before and (after > 0).sum() > 0.5 * (before > 0).sum()  # the real structure stays


def test_multichannel_files_are_grouped_into_cases(synth_task_4d: Path, tmp_path: Path) -> None:
    """nnU-Net's layout: case_0000, case_0001 are the two channels of one case, stacked as the 4D original."""
    from mlops.pipeline import load_channels
    from mlops.predict import group_channels, output_name
    from mlops.volumes import InputError

    src = nib.load(synth_task_4d / "imagesTs" / "synth_004.nii.gz")
    four_d = np.asarray(src.dataobj, dtype=np.float32)
    folder = tmp_path / "in"
    folder.mkdir()
    for c in range(2):
        nib.save(nib.Nifti1Image(four_d[..., c], src.affine, src.header), folder / f"synth_004_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(four_d[..., c], src.affine, src.header), folder / f"other_{c:04d}.nii.gz")
    nib.save(src, folder / "whole4d.nii.gz")  # a 4D file stays one case
    files = sorted(folder.iterdir())
    firsts, groups = group_channels(files, 2)
    assert [p.name for p in firsts] == ["other_0000.nii.gz", "synth_004_0000.nii.gz", "whole4d.nii.gz"]
    assert [p.name for p in groups[folder / "synth_004_0000.nii.gz"]] == [
        "synth_004_0000.nii.gz",
        "synth_004_0001.nii.gz",
    ]
    assert output_name(firsts[1]) == "synth_004.nii.gz"
    img, data = load_channels(groups[folder / "synth_004_0000.nii.gz"], None)
    assert data.shape == four_d.shape and np.array_equal(data, four_d)
    assert np.allclose(img.affine, src.affine)
    (folder / "other_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"other: the model takes 2 channels.*missing other_0001"):
        group_channels(sorted(folder.iterdir()), 2)
    shifted = src.affine.copy()
    shifted[0, 3] += 5
    nib.save(nib.Nifti1Image(four_d[..., 1], shifted, src.header), folder / "synth_004_0001.nii.gz")
    with pytest.raises(InputError, match="channels of one case must share one grid"):
        load_channels(groups[folder / "synth_004_0000.nii.gz"], None)


@pytest.mark.parametrize(
    "command", ["prepare", "train", "validate", "find-best", "evaluate", "predict", "export", "serve", "drift"]
)
def test_every_dataset_command_takes_dataset(command: str) -> None:
    from typer.testing import CliRunner

    from mlops.cli import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--dataset" in result.output and "-d" in result.output
    if command in ("train", "validate", "predict"):
        assert "--device" in result.output and "-D" in result.output
