"""The one module that imports ``nnunetv2`` and knows its quirks.

Quirks handled here:
- nnU-Net reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` from the environment;
  :func:`mlops.workspace.export_folders` sets them (absolute) before any nnU-Net call.
- nnU-Net looks classes up by name by importing every module of a package (``recursive_find_python_class``). For
  trainers that walk reaches variants importing ``timm``, hence ``torchvision``, whose only wheel here is a CUDA build
  that fails to import beside CPU torch. We therefore import the default fingerprint extractor, planner and trainer
  classes directly and never trigger a by-name search on the CPU path.
- nnU-Net prints its progress chatter; it is routed into loguru at DEBUG level (``--verbose`` shows it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from mlops.errors import PipelineError
from mlops.workspace import PATH_VARS, TRAINER_NAME, available_folds

if TYPE_CHECKING:  # heavy imports stay lazy: `mlops --help` must not pay for torch
    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _LogWriter(io.TextIOBase):
    """A file-like object that turns nnU-Net's print() output into loguru DEBUG lines."""

    def __init__(self) -> None:
        self._buf = ""

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line.strip():
                logger.debug(f"[nnU-Net] {line.rstrip()}")
        return len(s)

    def flush(self) -> None:
        if self._buf.strip():
            logger.debug(f"[nnU-Net] {self._buf.rstrip()}")
        self._buf = ""


@contextlib.contextmanager
def nnunet_output_to_log() -> Iterator[None]:
    """Capture nnU-Net's stdout into the log (its tqdm bars on stderr stay visible as progress)."""
    writer = _LogWriter()
    with contextlib.redirect_stdout(writer):
        try:
            yield
        finally:
            writer.flush()


def plan_and_preprocess(
    dataset_id: int,
    configurations: list[str],
    num_workers: int,
    planner: str = "ExperimentPlanner",
    plans_identifier: str = "nnUNetPlans",
    plan: bool = True,
) -> Path:
    """Run nnU-Net's fingerprint extraction and planning (if ``plan``), then preprocessing of ``configurations``.

    Returns the plans file. Uses nnU-Net's own classes through its Python API, not its command-line scripts.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    num_workers = max(1, int(num_workers))
    try:
        with nnunet_output_to_log():
            dataset_name = convert_id_to_dataset_name(dataset_id)
            if plan:
                logger.info(f"nnU-Net fingerprint extraction for {dataset_name} ({num_workers} workers)")
                extract_fingerprint_dataset(dataset_id, DatasetFingerprintExtractor, num_workers, clean=True)
                if planner == "ExperimentPlanner":
                    planner_class = ExperimentPlanner
                else:  # a non-default planner needs nnU-Net's by-name search (experiment_planning only, not trainers)
                    import nnunetv2
                    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

                    planner_class = recursive_find_python_class(
                        os.path.join(nnunetv2.__path__[0], "experiment_planning"),
                        planner,
                        current_module="nnunetv2.experiment_planning",
                    )
                    if planner_class is None:
                        raise PipelineError(f"unknown nnU-Net experiment planner {planner!r} (prepare.planner)")
                logger.info(f"nnU-Net experiment planning with {planner}")
                _, plans_identifier = plan_experiment_dataset(dataset_id, planner_class)
            for configuration in configurations:
                logger.info(f"nnU-Net preprocessing {dataset_name} / {configuration}")
                preprocess_dataset(dataset_id, plans_identifier, [configuration], [num_workers])
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"nnU-Net planning/preprocessing of dataset {dataset_id} failed: {exc}") from exc
    return Path(os.environ["nnUNet_preprocessed"]) / dataset_name / f"{plans_identifier}.json"


# ------------------------------------------------------------------------------------------------------ training


@dataclass
class TrainSettings:
    """What nnU-Net's trainer needs, plus the schedule we set on it (instance attributes, not a subclass)."""

    dataset_id: int
    configuration: str
    fold: int | str
    plans_identifier: str = "nnUNetPlans"
    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    initial_lr: float = 1e-2
    batch_size: int | None = None  # None: the batch size nnU-Net planned
    save_every: int = 50
    seed: int | None = None
    continue_training: bool = False
    validate: bool = True
    save_probabilities: bool = False


@dataclass
class EpochMetrics:
    """One epoch as nnU-Net's logger recorded it."""

    epoch: int  # 0-based
    num_epochs: int
    train_loss: float
    val_loss: float
    pseudo_dice: list[float]
    mean_fg_dice: float
    ema_fg_dice: float
    lr: float
    epoch_time_s: float


@dataclass
class TrainOutcome:
    output_folder: Path
    checkpoint: Path
    epochs_completed: int
    iterations_run: int
    resumed_from_epoch: int
    validation_summary: Path | None


class TrainingInterrupted(PipelineError):
    """Ctrl-C: a checkpoint was written; the message says how to resume."""


EpochCallback = Callable[[EpochMetrics], None]
StepCallback = Callable[[], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error, not a silent fallback."""
    import torch

    name = name.lower()
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise PipelineError(
            f"--device cuda: PyTorch sees no CUDA GPU (torch {torch.__version__}, {build}); use --device cpu or auto"
        )
    if name == "mps" and not mps:
        raise PipelineError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    if name not in ("cuda", "mps", "cpu"):
        raise PipelineError(f"unknown device {name!r}; choose auto, cuda, cpu or mps")
    return torch.device(name)


def build_trainer(settings: TrainSettings, device: torch.device) -> nnUNetTrainer:
    """nnU-Net's own trainer on the preprocessed dataset, with our schedule set before ``initialize()`` reads it."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    name = convert_id_to_dataset_name(settings.dataset_id)
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    plans = load_json(str(pre / f"{settings.plans_identifier}.json"))
    if settings.configuration not in plans["configurations"]:
        raise PipelineError(
            f"{pre / (settings.plans_identifier + '.json')}: no configuration {settings.configuration!r} "
            f"(planned: {sorted(plans['configurations'])}); run `mlops prepare prepare.configurations=[...]`"
        )
    plans["continue_training"] = settings.continue_training  # nnU-Net 2.8 pops this key in __init__
    if settings.batch_size:
        plans["configurations"][settings.configuration]["batch_size"] = int(settings.batch_size)
    dataset_json = load_json(str(pre / "dataset.json"))
    with nnunet_output_to_log():
        trainer = nnUNetTrainer(
            plans=plans,
            configuration=settings.configuration,
            fold=settings.fold,
            dataset_json=dataset_json,
            device=device,
        )
    trainer.num_epochs = int(settings.epochs)
    trainer.num_iterations_per_epoch = int(settings.iterations_per_epoch)
    trainer.num_val_iterations_per_epoch = int(settings.val_iterations_per_epoch)
    trainer.initial_lr = float(settings.initial_lr)
    trainer.save_every = max(1, int(settings.save_every))
    return trainer


def _epoch_metrics(trainer: nnUNetTrainer) -> EpochMetrics:
    get = trainer.logger.get_value
    return EpochMetrics(
        epoch=trainer.current_epoch - 1,
        num_epochs=trainer.num_epochs,
        train_loss=float(get("train_losses", step=-1)),
        val_loss=float(get("val_losses", step=-1)),
        pseudo_dice=[float(d) for d in get("dice_per_class_or_region", step=-1)],
        mean_fg_dice=float(get("mean_fg_dice", step=-1)),
        ema_fg_dice=float(get("ema_fg_dice", step=-1)),
        lr=float(get("lrs", step=-1)),
        epoch_time_s=float(get("epoch_end_timestamps", step=-1) - get("epoch_start_timestamps", step=-1)),
    )


def _install_hooks(trainer: nnUNetTrainer, on_epoch: EpochCallback | None, on_step: StepCallback | None) -> list[int]:
    """Wrap the instance's epoch-end and train-step methods (the class, hence checkpoints, stay nnU-Net's own)."""
    steps = [0]
    epoch_end, train_step = trainer.on_epoch_end, trainer.train_step

    def on_epoch_end() -> None:
        epoch_end()
        if on_epoch is not None and trainer.local_rank == 0:
            on_epoch(_epoch_metrics(trainer))

    def step(batch: dict) -> dict:
        out = train_step(batch)
        steps[0] += 1
        if on_step is not None:
            on_step()
        return out

    trainer.on_epoch_end = on_epoch_end
    trainer.train_step = step
    return steps


RESUMABLE = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def _checkpoint_to_resume(folder: Path) -> Path | None:
    """The checkpoint of the run that was interrupted: the newest of final and latest (best only as a last resort).

    nnU-Net's own order (final, then latest) resumes a finished old run when a newer run over it was interrupted;
    the newest file is the run that stopped last. (A new run moves a finished one aside, see :func:`_archive_run`,
    so this matters only for folders written before that.)
    """
    found = [folder / n for n in RESUMABLE[:2] if (folder / n).is_file()]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime_ns)
    best = folder / RESUMABLE[2]
    return best if best.is_file() else None


def _archive_run(folder: Path) -> Path | None:
    """Move a previous run's checkpoints and validation aside before a new run starts from scratch in ``folder``.

    Otherwise the old ``checkpoint_final.pth`` would sit beside the new run's ``checkpoint_latest.pth`` and a later
    ``--continue`` (or a predictor) could take the wrong one. Returns where the old run went.
    """
    import time

    old = [folder / n for n in (*RESUMABLE, "validation", "progress.png") if (folder / n).exists()]
    if not any(p.name.endswith(".pth") for p in old):
        return None
    dest = folder / "previous_runs" / time.strftime("%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for path in old:
        path.rename(dest / path.name)
    return dest


def _save_interrupted(trainer: nnUNetTrainer) -> Path | None:
    """Checkpoint the completed epochs only: the interrupted epoch is redone on resume."""
    if trainer.optimizer is None:
        return None
    done = trainer.current_epoch  # epochs fully completed (on_epoch_end increments after each)
    for values in trainer.logger.local_logger.my_fantastic_logging.values():
        del values[done:]
    path = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.current_epoch = done - 1  # save_checkpoint stores current_epoch + 1
    try:
        trainer.save_checkpoint(str(path))
    finally:
        trainer.current_epoch = done
    return path


def _stop_dataloaders(trainer: nnUNetTrainer) -> None:
    for loader in (trainer.dataloader_train, trainer.dataloader_val):
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            with contextlib.suppress(Exception):
                finish()


def train_fold(
    settings: TrainSettings,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    on_start: Callable[[int], None] | None = None,
) -> TrainOutcome:
    """Train one fold with nnU-Net's trainer in this process, then run nnU-Net's validation of that fold."""
    import random

    import numpy as np
    import torch

    if settings.seed is not None:
        random.seed(settings.seed)
        np.random.seed(settings.seed)
        torch.manual_seed(settings.seed)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    elif device.type == "cuda":
        torch.set_num_threads(1)
        torch.backends.cudnn.benchmark = True

    trainer = build_trainer(settings, device)
    folder = Path(trainer.output_folder)
    resumed_from = 0
    if not settings.continue_training and trainer.local_rank == 0:
        archived = _archive_run(folder)
        if archived is not None:
            logger.warning(
                f"{folder} held an earlier run; starting a new one from scratch and moving the old checkpoints to "
                f"{archived} (use --continue to extend a run instead)"
            )
    if settings.continue_training:
        checkpoint = _checkpoint_to_resume(folder)
        if checkpoint is None:
            logger.warning(f"No checkpoint in {folder} to continue from; starting a new training")
        else:
            with nnunet_output_to_log():
                trainer.load_checkpoint(str(checkpoint))
            resumed_from = trainer.current_epoch
            if checkpoint.name == "checkpoint_final.pth" and resumed_from >= trainer.num_epochs:
                return _already_trained(trainer, folder, settings, resumed_from)
            logger.info(f"Resuming from {checkpoint.name} at epoch {resumed_from}/{trainer.num_epochs}")
    steps = _install_hooks(trainer, on_epoch, on_step)
    if on_start is not None:
        on_start(resumed_from)
    try:
        with nnunet_output_to_log():
            trainer.run_training()
    except KeyboardInterrupt:
        saved = _save_interrupted(trainer)
        _stop_dataloaders(trainer)
        where = f"saved {saved} (epoch {trainer.current_epoch})" if saved else "nothing trained yet, no checkpoint"
        raise TrainingInterrupted(f"training interrupted; {where}.") from None
    except Exception as exc:
        _stop_dataloaders(trainer)
        raise PipelineError(f"nnU-Net training failed in {folder}: {type(exc).__name__}: {exc}") from exc

    summary = None
    if settings.validate:
        _validate(trainer, folder, settings.save_probabilities)
        summary = folder / "validation" / "summary.json"
    return TrainOutcome(
        output_folder=folder,
        checkpoint=folder / "checkpoint_final.pth",
        epochs_completed=trainer.current_epoch,
        iterations_run=steps[0],
        resumed_from_epoch=resumed_from,
        validation_summary=summary,
    )


def validate_fold(settings: TrainSettings, device: torch.device, checkpoint: str = "checkpoint_final.pth") -> Path:
    """nnU-Net's own validation of a trained fold (its ``--val``): load ``checkpoint``, predict and score the fold's
    validation cases with ``perform_actual_validation``. Returns the ``validation/summary.json`` it writes."""
    import torch

    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    trainer = build_trainer(settings, device)
    folder = Path(trainer.output_folder)
    path = folder / checkpoint
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("checkpoint_*.pth")) if folder.is_dir() else []
        hint = "" if checkpoint != "checkpoint_final.pth" or not found else " (an unfinished run: resume it first)"
        raise PipelineError(
            f"{path}: no such checkpoint (found: {', '.join(found) or 'none'}){hint}; "
            f"train the fold with `mlops train --fold {settings.fold}`"
        )
    try:
        with nnunet_output_to_log():
            trainer.load_checkpoint(str(path))
    except Exception as exc:
        raise PipelineError(f"{path}: cannot load the checkpoint ({type(exc).__name__}: {exc})") from exc
    _validate(trainer, folder, settings.save_probabilities)
    return folder / "validation" / "summary.json"


def _validate(trainer: nnUNetTrainer, folder: Path, save_probabilities: bool) -> None:
    """nnU-Net's validation of a fold's held-out cases (predicted, exported and scored into validation/)."""
    logger.info("Running nnU-Net's validation of this fold")
    try:
        with nnunet_output_to_log():
            trainer.perform_actual_validation(save_probabilities)
    except Exception as exc:
        raise PipelineError(f"nnU-Net validation failed in {folder}: {type(exc).__name__}: {exc}") from exc


def _already_trained(trainer: nnUNetTrainer, folder: Path, settings: TrainSettings, epochs: int) -> TrainOutcome:
    """`--continue` on a finished fold (a multi-fold run resumed past it): nothing to train; validate if missing."""
    summary = folder / "validation" / "summary.json"
    logger.info(f"{folder.name} already finished its {epochs} epochs; nothing to resume")
    if settings.validate and not summary.is_file():
        _validate(trainer, folder, settings.save_probabilities)
    return TrainOutcome(
        folder, folder / "checkpoint_final.pth", epochs, 0, epochs, summary if summary.is_file() else None
    )


def _ddp_worker(rank: int, world_size: int, settings: TrainSettings, paths: dict[str, str]) -> None:
    """One rank of nnU-Net's multi-GPU training (mirrors nnunetv2.run.run_training.run_ddp, with our schedule)."""
    import torch
    import torch.distributed as dist

    os.environ.update(paths)
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    try:
        torch.cuda.set_device(torch.device("cuda", dist.get_rank()))
        train_fold(settings, torch.device("cuda"))
    finally:
        dist.destroy_process_group()


def train_fold_ddp(settings: TrainSettings, num_gpus: int) -> None:
    """nnU-Net's DDP training on ``num_gpus`` GPUs of this machine (CUDA only)."""
    import socket

    import torch
    import torch.multiprocessing as mp

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < num_gpus:
        raise PipelineError(f"--gpus {num_gpus}: PyTorch sees {visible} CUDA GPU(s)")
    os.environ.setdefault("MASTER_ADDR", "localhost")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    paths = {v: os.environ[v] for v in PATH_VARS}
    mp.spawn(_ddp_worker, args=(num_gpus, settings, paths), nprocs=num_gpus, join=True)


# ----------------------------------------------------------------------------------------------------- inference
# The engine in ``mlops.inference`` runs the network; everything that decides the answer (preprocessing, tiling,
# Gaussian weighting, resampling back, argmax, un-cropping) is nnU-Net's own code, called from here.
@dataclass
class TrainedNetwork:
    """A trained nnU-Net model as the engine needs it, loaded once.

    Axis order is nnU-Net's (SimpleITK's z, y, x) for everything here; the engine transposes at its edge.
    """

    model_dir: Path
    folds: list[int | str]
    checkpoint: str
    network: torch.nn.Module | None  # fp32, eval mode, on the CPU, first fold's weights; None once released
    fold_weights: list[dict]
    patch_size: tuple[int, ...]
    mirror_axes: tuple[int, ...]  # spatial axes nnU-Net mirrors at inference (0-based)
    num_channels: int
    num_classes: int  # segmentation heads (logit channels)
    labels: dict[int, str]
    target_spacing: tuple[float, ...]
    trainer_name: str
    plans_manager: object
    configuration_manager: object
    label_manager: object
    dataset_json: dict
    preprocessor: object

    def checkpoint_files(self) -> list[Path]:
        return [self.model_dir / f"fold_{f}" / self.checkpoint for f in self.folds]

    def release_weights(self) -> None:
        """Drop the loader's network and weights once the engine's runners hold their own copies (a compiled
        OpenVINO/ONNX graph, or one PyTorch network per fold): two copies of the weights fewer in memory."""
        self.network = None
        self.fold_weights = []


def load_trained_network(model_dir: Path, folds: list[int | str] | None, checkpoint: str) -> TrainedNetwork:
    """Load a model folder with nnU-Net's own loader (architecture from the plans, weights of every fold)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model_dir = Path(model_dir)
    if not (model_dir / "plans.json").is_file():
        raise PipelineError(
            f"{model_dir}: no trained nnU-Net model here (no plans.json); train one with `mlops train --fold 0`"
        )
    found = available_folds(model_dir, checkpoint)
    folds = found if folds is None else list(folds)
    missing = [f for f in folds if f not in found]
    if not folds or missing:
        raise PipelineError(
            f"{model_dir}: no {checkpoint} for fold(s) {missing or folds} (available: {found or 'none'}); "
            "train them with `mlops train --fold N`"
        )
    try:
        with nnunet_output_to_log():
            loader = nnUNetPredictor(
                device=torch.device("cpu"), perform_everything_on_device=False, verbose=False, allow_tqdm=False
            )
            loader.initialize_from_trained_model_folder(str(model_dir), tuple(folds), checkpoint)
    except Exception as exc:
        raise PipelineError(f"{model_dir}: cannot load the nnU-Net model ({type(exc).__name__}: {exc})") from exc
    cm = loader.configuration_manager
    network = loader.network.eval()
    return TrainedNetwork(
        model_dir=model_dir,
        folds=folds,
        checkpoint=checkpoint,
        network=network,
        fold_weights=loader.list_of_parameters,
        patch_size=tuple(int(s) for s in cm.patch_size),
        mirror_axes=tuple(loader.allowed_mirroring_axes or ()),
        num_channels=len(loader.dataset_json["channel_names"]),
        num_classes=int(loader.label_manager.num_segmentation_heads),
        labels={int(v): k for k, v in loader.dataset_json["labels"].items() if isinstance(v, int)},
        target_spacing=tuple(float(s) for s in cm.spacing),
        trainer_name=loader.trainer_name,
        plans_manager=loader.plans_manager,
        configuration_manager=cm,
        label_manager=loader.label_manager,
        dataset_json=loader.dataset_json,
        preprocessor=cm.preprocessor_class(verbose=False),
    )


def preprocess(model: TrainedNetwork, data: np.ndarray, spacing: tuple[float, ...]) -> tuple[np.ndarray, dict]:
    """nnU-Net's preprocessing of one case: ``data`` is (c, z, y, x) float32, ``spacing`` (z, y, x) in mm."""
    props = {"spacing": [float(s) for s in spacing]}
    pre, _, props = model.preprocessor.run_case_npy(
        data, None, props, model.plans_manager, model.configuration_manager, model.dataset_json
    )
    return pre, props


def gaussian_weights(patch_size: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """nnU-Net's Gaussian importance map for a tile (computed in half precision, as nnU-Net does), as fp32."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    half = compute_gaussian(tuple(patch_size), sigma_scale=1.0 / 8, value_scaling_factor=10, device=device)
    return half.float()


def tile_starts(shape: tuple[int, ...], patch_size: tuple[int, ...], step: float) -> list[list[int]]:
    """nnU-Net's tile positions per axis for an image of ``shape`` (already padded to at least the patch)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    return compute_steps_for_sliding_window(tuple(shape), tuple(patch_size), step)


def pad_to_patch(data: torch.Tensor, patch_size: tuple[int, ...]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad (c, z, y, x) up to the patch size where smaller (nnU-Net's padding); returns the un-padding slicer."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    padded, revert = pad_nd_image(data, tuple(patch_size), "constant", {"value": 0}, True, None)
    return padded, tuple(revert)


def logits_to_segmentation(
    model: TrainedNetwork, logits: torch.Tensor, props: dict, probabilities: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """nnU-Net's export: resample logits to the input spacing, argmax (or softmax), undo cropping and transpose."""
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.cpu(),
        model.plans_manager,
        model.configuration_manager,
        model.label_manager,
        props,
        return_probabilities=probabilities,
        num_threads_torch=max(1, torch_threads()),
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def nnunet_predictor(model: TrainedNetwork, device: torch.device, tta: bool, tile_step_size: float) -> object:
    """nnU-Net's own ``nnUNetPredictor`` on an already loaded model (``predict.backend=nnunet``, for comparison)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with nnunet_output_to_log():
        predictor = nnUNetPredictor(
            tile_step_size=tile_step_size,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.manual_initialization(
            model.network,
            model.plans_manager,
            model.configuration_manager,
            model.fold_weights,
            model.dataset_json,
            model.trainer_name,
            model.mirror_axes or None,
        )
    return predictor


# ------------------------------------------------------------------------------------- best configuration + pp
def find_best_configuration(
    dataset_id: int,
    configurations: list[str],
    folds: list[int],
    plans_identifier: str = "nnUNetPlans",
    allow_ensembling: bool = True,
    num_processes: int = 2,
) -> dict:
    """nnU-Net's ``find_best_configuration`` (its Python API): merge the folds' validation of each trained
    configuration (and, when ensembling, of each pair), pick the best foreground Dice, and determine the
    post-processing on the cross-validation. Writes nnU-Net's ``inference_information.json`` and
    ``inference_instructions.txt`` beside the dataset's models, as its command-line tool does."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.evaluation import find_best_configuration as fbc
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    name = convert_id_to_dataset_name(dataset_id)
    models = [{"plans": plans_identifier, "configuration": c, "trainer": TRAINER_NAME} for c in configurations]
    results = Path(os.environ["nnUNet_results"]) / name
    try:
        with nnunet_output_to_log():
            info = fbc.find_best_configuration(
                name,
                tuple(models),
                allow_ensembling=allow_ensembling and len(models) > 1,
                num_processes=max(1, int(num_processes)),
                overwrite=True,
                folds=tuple(folds),
                strict=True,
            )
            save_json(info, str(results / "inference_information.json"), sort_keys=False)
            fbc.print_inference_instructions(info, str(results / "inference_instructions.txt"))
    except Exception as exc:
        raise PipelineError(f"nnU-Net's find_best_configuration on {name} failed: {type(exc).__name__}: {exc}") from exc
    return info


def _plain(value: object) -> object:
    """numpy scalars as plain numbers (nnU-Net stores label ids as np.int64)."""
    return value.item() if hasattr(value, "item") else str(value)


def load_postprocessing(pkl: Path) -> tuple[Callable[[np.ndarray], np.ndarray], list[str]]:
    """The post-processing ``find_best_configuration`` chose (nnU-Net's ``postprocessing.pkl``), as one function
    applying it with nnU-Net's ``apply_postprocessing``, and a description of its steps."""
    from batchgenerators.utilities.file_and_folder_operations import load_pickle
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

    try:
        fns, kwargs = load_pickle(str(pkl))
    except Exception as exc:
        raise PipelineError(f"{pkl}: unreadable nnU-Net post-processing file ({type(exc).__name__}: {exc})") from exc
    steps = [
        f"{getattr(f, '__name__', f)}({', '.join(f'{k}={json.dumps(v, default=_plain)}' for k, v in kw.items())})"
        for f, kw in zip(fns, kwargs, strict=True)
    ]
    return (lambda seg: apply_postprocessing(seg, fns, kwargs)), steps


def confusion_counts(reference: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int, int]:
    """nnU-Net's own ``compute_tp_fp_fn_tn`` of two boolean masks: true/false positives, false/true negatives."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    tp, fp, fn, tn = compute_tp_fp_fn_tn(reference.astype(bool), prediction.astype(bool))
    return int(tp), int(fp), int(fn), int(tn)
