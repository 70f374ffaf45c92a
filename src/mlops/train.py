"""`mlops train`: nnU-Net training of one fold, configured by Hydra, logged with loguru, tracked in W&B."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from mlops import nnunet
from mlops.config import save_config
from mlops.errors import ConfigError
from mlops.evaluate import (
    NEAR_ZERO_DICE,
    DiceReport,
    from_nnunet_summary,
    labels_from_dataset_json,
    weak_labels,
    write_report,
)
from mlops.interrupts import sigterm_as_interrupt
from mlops.logs import add_file_sink
from mlops.progress import progress_bar
from mlops.tracking import Tracker
from mlops.workspace import DatasetIdentity, export_paths, model_dir_for, parse_fold, prepared_dataset


@dataclass
class TrainResult:
    dataset: str
    output_folder: Path
    checkpoint: Path
    epochs_completed: int
    iterations_run: int
    resumed_from_epoch: int
    validation: DiceReport | None
    report_file: Path | None


def validation_report(
    cfg: DictConfig, identity: DatasetIdentity, pre_dir: Path, fold: int | str
) -> tuple[DiceReport, Path]:
    """nnU-Net's validation of ``fold`` as a Dice report, also written under ``evaluate.output_dir``."""
    summary = model_dir_for(cfg, identity) / f"fold_{fold}" / "validation" / "summary.json"
    report = from_nnunet_summary(summary, labels_from_dataset_json(pre_dir / "dataset.json"))
    stem = f"validation_{identity.folder}_{cfg.train.configuration}_fold{fold}"
    return report, write_report(report, Path(cfg.evaluate.output_dir), stem)


# Measured here (2 CPU cores, 2026-12-02, train=cpu on Task04 alone): nnU-Net's trainer ran 335-371 s per epoch of
# 50 iterations at batch 6 plus 10 validation iterations, about 1.15 s per sample of a 40x56x40 patch. (An earlier
# machine of this kind ran 0.75 s; the figure varies with the host.)
CPU_SECONDS_PER_SAMPLE = 1.15
CPU_REFERENCE_VOXELS = 40 * 56 * 40
CPU_REFERENCE_CORES = 2
LONG_RUN_S = 2 * 3600


def estimate_cpu_seconds(pre_dir: Path, cfg: DictConfig) -> tuple[float, int, list[int]]:
    """A rough duration of the schedule on this machine's CPU, from the planned patch and batch size."""
    t = cfg.train
    plans = json.loads((pre_dir / f"{cfg.prepare.plans_identifier}.json").read_text())
    conf = plans["configurations"].get(str(t.configuration), {})
    patch = [int(p) for p in conf.get("patch_size", [40, 56, 40])]
    batch = int(t.batch_size) if t.get("batch_size") else int(conf.get("batch_size", 2))
    voxels = 1
    for p in patch:
        voxels *= p
    cores = os.cpu_count() or 1
    per_iteration = CPU_SECONDS_PER_SAMPLE * batch * voxels / CPU_REFERENCE_VOXELS * CPU_REFERENCE_CORES / cores
    iterations = int(t.epochs) * (int(t.iterations_per_epoch) + int(t.val_iterations_per_epoch) // 3)
    return per_iteration * iterations, batch, patch


def human_duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} hours"
    return f"{seconds / 60:.0f} minutes"


def _epoch_line(m: nnunet.EpochMetrics) -> str:
    dice = ", ".join(f"{d:.3f}" for d in m.pseudo_dice)
    return (
        f"Epoch {m.epoch + 1}/{m.num_epochs}: train loss {m.train_loss:.4f}, val loss {m.val_loss:.4f}, "
        f"pseudo Dice [{dice}], lr {m.lr:.5f}, {m.epoch_time_s:.1f} s"
    )


def _settings(
    cfg: DictConfig, identity: DatasetIdentity, fold: int | str, continue_training: bool
) -> nnunet.TrainSettings:
    t = cfg.train
    return nnunet.TrainSettings(
        dataset_id=identity.id,
        configuration=str(t.configuration),
        fold=fold,
        plans_identifier=str(cfg.prepare.plans_identifier),
        epochs=int(t.epochs),
        iterations_per_epoch=int(t.iterations_per_epoch),
        val_iterations_per_epoch=int(t.val_iterations_per_epoch),
        initial_lr=float(t.initial_lr),
        batch_size=int(t.batch_size) if t.get("batch_size") else None,
        save_every=int(t.save_every),
        seed=int(cfg.seed) if cfg.get("seed") is not None else None,
        continue_training=continue_training,
        validate=bool(t.validate),
        save_probabilities=bool(t.save_probabilities),
    )


def warn_weak_labels(report: DiceReport) -> None:
    """A warning when a label's validation Dice is near zero (an all-background model must not go out silently)."""
    weak = weak_labels(report)
    if weak:
        shown = ", ".join(f"{n} {v:.3f}" for n, v in weak.items())
        logger.warning(
            f"Validation Dice near zero for {shown} (< {NEAR_ZERO_DICE}): this model does not segment "
            f"{'this label' if len(weak) == 1 else 'these labels'} yet; train longer (train=cpu on a CPU, "
            "nnU-Net's schedule on a GPU) before serving it"
        )


def validate(cfg: DictConfig, best: bool = False) -> tuple[DiceReport, Path]:
    """nnU-Net's validation of a trained fold, re-run (e.g. after ``train.validate=false``, or with ``--best``)."""
    fold = parse_fold(cfg.train.fold)
    export_paths(cfg)
    identity, pre_dir = prepared_dataset(cfg)
    os.environ["nnUNet_n_proc_DA"] = str(max(0, int(cfg.train.num_workers)))
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, int(cfg.prepare.num_workers))))
    os.environ["nnUNet_wandb_enabled"] = "0"
    settings = _settings(cfg, identity, fold, continue_training=False)
    checkpoint = "checkpoint_best.pth" if best else "checkpoint_final.pth"
    device = nnunet.resolve_device(str(cfg.train.device))
    logger.info(
        f"nnU-Net validation of {identity.folder} {settings.configuration} fold {fold} ({checkpoint}, {device})"
    )
    with sigterm_as_interrupt():
        nnunet.validate_fold(settings, device, checkpoint)
    report, path = validation_report(cfg, identity, pre_dir, fold)
    warn_weak_labels(report)
    return report, path


def train(cfg: DictConfig, continue_training: bool = False) -> TrainResult:
    """Train ``cfg.train.fold`` of the prepared dataset, validate it, and record it in W&B."""
    t = cfg.train
    fold = parse_fold(t.fold)
    if int(t.epochs) < 1 or int(t.iterations_per_epoch) < 1 or int(t.val_iterations_per_epoch) < 1:
        raise ConfigError("train.epochs, train.iterations_per_epoch and train.val_iterations_per_epoch must be >= 1")
    export_paths(cfg)
    identity, pre_dir = prepared_dataset(cfg)
    # nnU-Net reads its worker counts from the environment; its own W&B logger stays off (we log richer data).
    os.environ["nnUNet_n_proc_DA"] = str(max(0, int(t.num_workers)))
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, int(cfg.prepare.num_workers))))
    os.environ["nnUNet_wandb_enabled"] = "0"
    settings = _settings(cfg, identity, fold, continue_training)
    model_dir = model_dir_for(cfg, identity)
    out = model_dir / f"fold_{fold}"
    out.mkdir(parents=True, exist_ok=True)
    sink = add_file_sink(out / "mlops_train.log")
    save_config(cfg, out / "mlops_train_config.yaml")
    labels = labels_from_dataset_json(pre_dir / "dataset.json")
    tracker = Tracker(
        mode=str(cfg.wandb.mode),
        project=str(cfg.wandb.project),
        entity=cfg.wandb.entity,
        run_dir=out,
        name=f"{identity.folder}-{settings.configuration}-fold{fold}",
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        resume=continue_training,
    )
    exit_code = 1
    try:
        logger.info(
            f"Training {identity.folder} {settings.configuration} fold {fold}: {settings.epochs} epochs x "
            f"{settings.iterations_per_epoch} iterations (+{settings.val_iterations_per_epoch} val), "
            f"lr {settings.initial_lr}, output {out}"
        )
        if int(t.gpus) > 1:
            nnunet.train_fold_ddp(settings, int(t.gpus))
            outcome = None
        else:
            device = nnunet.resolve_device(str(t.device))
            logger.info(f"Device: {device}")
            if device.type == "cpu":
                estimate, batch, patch = estimate_cpu_seconds(pre_dir, cfg)
                if estimate > LONG_RUN_S:
                    logger.warning(
                        f"{settings.epochs} epochs x {settings.iterations_per_epoch} iterations (batch {batch}, patch "
                        f"{'x'.join(map(str, patch))}) on a CPU take about {human_duration(estimate)} here; nnU-Net's "
                        "full schedule is meant for a GPU. train=cpu (12 x 50, batch 6) learns hippocampus (Dice 0.85) "
                        "in about 75 minutes on 2 cores; train=quick is a seconds-long demo"
                    )
            names = [labels[v] for v in sorted(labels) if v != 0]

            first_epoch = [True]

            def on_epoch(m: nnunet.EpochMetrics) -> None:
                logger.info(_epoch_line(m))
                if first_epoch[0] and m.epoch + 1 < m.num_epochs:
                    first_epoch[0] = False
                    left = (m.num_epochs - m.epoch - 1) * m.epoch_time_s
                    logger.info(
                        f"At this pace the remaining {m.num_epochs - m.epoch - 1} epochs take about "
                        f"{human_duration(left)}"
                    )
                metrics = {
                    "train/loss": m.train_loss,
                    "val/loss": m.val_loss,
                    "val/mean_fg_pseudo_dice": m.mean_fg_dice,
                    "val/ema_fg_pseudo_dice": m.ema_fg_dice,
                    "lr": m.lr,
                    "epoch_time_s": m.epoch_time_s,
                    "epoch": m.epoch + 1,
                }
                metrics.update({f"val/pseudo_dice/{n}": d for n, d in zip(names, m.pseudo_dice, strict=False)})
                tracker.log(metrics, step=m.epoch + 1)

            with sigterm_as_interrupt(), progress_bar() as bar:
                task = bar.add_task("Training iterations", total=settings.epochs * settings.iterations_per_epoch)
                outcome = nnunet.train_fold(
                    settings,
                    device,
                    on_epoch=on_epoch,
                    on_step=lambda: bar.advance(task),
                    on_start=lambda epoch: bar.update(task, completed=epoch * settings.iterations_per_epoch),
                )
        report, report_file = None, None
        if settings.validate and (out / "validation" / "summary.json").is_file():
            report, report_file = validation_report(cfg, identity, pre_dir, fold)
            logger.info(f"Validation Dice: {report.mean} (foreground mean {report.foreground_mean})")
            warn_weak_labels(report)
            tracker.summary({f"final/dice/{k}": v for k, v in report.mean.items()})
            tracker.summary({"final/dice/foreground_mean": report.foreground_mean})
        if cfg.monitor.get("profile_on_train"):
            write_reference_profile(cfg, model_dir, fold)
        if cfg.wandb.log_model:
            tracker.log_model(
                name=f"nnunet-{identity.folder}-{settings.configuration}-fold{fold}",
                files=[
                    out / "checkpoint_final.pth",
                    model_dir / "plans.json",
                    model_dir / "dataset.json",
                    model_dir / "dataset_fingerprint.json",
                ],
                metadata={"dataset": identity.folder, "configuration": settings.configuration, "fold": str(fold)},
                aliases=["latest", f"fold_{fold}"],
            )
        exit_code = 0
        return TrainResult(
            dataset=identity.folder,
            output_folder=out,
            checkpoint=out / "checkpoint_final.pth",
            epochs_completed=outcome.epochs_completed if outcome else settings.epochs,
            iterations_run=outcome.iterations_run if outcome else 0,
            resumed_from_epoch=outcome.resumed_from_epoch if outcome else 0,
            validation=report,
            report_file=report_file,
        )
    finally:
        tracker.finish(exit_code)
        logger.remove(sink)


def write_reference_profile(cfg: DictConfig, model_dir: Path, fold: int | str) -> Path | None:
    """The monitoring reference profile of the fold just trained; a failure is a warning, never a lost training."""
    from mlops.monitoring.profile import profile_model

    try:
        return profile_model(cfg, model_dir, folds=[fold])
    except Exception as exc:
        logger.warning(f"{model_dir}: no reference profile written ({type(exc).__name__}: {exc}); "
                       "run `mlops monitor profile` later")  # fmt: skip
        return None
