"""Training commands: `mlops train`, `validate`, `find-best` and `evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from loguru import logger
from omegaconf import DictConfig
from rich.markup import escape
from rich.table import Table

from mlops.cli import common
from mlops.cli.common import app, handle_errors
from mlops.errors import ConfigError, MlopsError
from mlops.nnunet import TrainingInterrupted


@app.command()
@handle_errors
def train(
    args: list[str] = typer.Argument(
        None, metavar="[OVERRIDES]...", help=common.overrides_help("train.epochs=5 wandb.mode=disabled")
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
    fold: str = typer.Option(
        None, "--fold", "-f", help="0-4, all, or a list (0,1,2 / 0-4), trained one after another (default: train.fold)."
    ),
    configuration: str = typer.Option(None, "--configuration", "-c", help="2d, 3d_fullres, ... (train.configuration)."),
    device: str = typer.Option(None, "--device", "-D", help=common.DEVICE_HELP + " (default: train.device)."),
    gpus: int = typer.Option(None, "--gpus", help="Number of GPUs; >1 runs nnU-Net's DDP training."),
    resume: bool = typer.Option(False, "--continue", help="Resume each fold from its latest nnU-Net checkpoint."),
) -> None:
    """Train nnU-Net folds on the prepared dataset (nnU-Net's schedule by default; train=cpu for a CPU, train=quick
    for a seconds-long demo). Each fold is resumable on its own; Ctrl-C prints the exact command that resumes."""
    from mlops.train import train as run_train
    from mlops.workspace import parse_folds

    _, overrides = common.split_args(args, max_positional=0)
    selected = common.with_dataset(overrides, dataset)
    flags = {"train.configuration": configuration, "train.device": device, "train.gpus": gpus}
    cfg = common.compose(selected, **flags)
    folds = parse_folds(fold if fold is not None else str(cfg.train.fold))
    results = []
    for i, f in enumerate(folds):
        fold_cfg = common.compose(selected, **flags, **{"train.fold": str(f)})
        try:
            result = run_train(fold_cfg, continue_training=resume)
        except TrainingInterrupted as exc:
            hint = resume_command(fold_cfg, folds[i:], overrides, configuration, device, gpus)
            raise TrainingInterrupted(f"{exc} Resume with: {hint}") from None
        results.append(result)
        table = Table(title=f"{result.dataset} fold {f}", show_header=False, title_justify="left")
        table.add_column(overflow="fold")
        table.add_column(overflow="fold")
        resumed = f" (resumed at {result.resumed_from_epoch})" if result.resumed_from_epoch else ""
        table.add_row("epochs", f"{result.epochs_completed}{resumed}")
        table.add_row("iterations run", str(result.iterations_run))
        table.add_row("checkpoint", str(result.checkpoint))
        if result.validation is not None:
            for name, value in result.validation.mean.items():
                table.add_row(f"Dice {name}", "n/a" if value is None else f"{value:.4f}")
            table.add_row("report", str(result.report_file))
        common.out.print(table)
    if len(results) > 1:
        common.out.print(f"Trained folds {','.join(str(f) for f in folds)}; `mlops find-best` picks the configuration.")


def resume_command(
    cfg: DictConfig,
    folds: list[int | str],
    overrides: list[str],
    configuration: str | None,
    device: str | None,
    gpus: int | None,
) -> str:
    """The exact command that resumes this run: its dataset (by folder name), the folds left, the user's overrides."""
    import shlex

    from mlops.workspace import export_paths, prepared_dataset

    export_paths(cfg)
    identity, _ = prepared_dataset(cfg)
    words = ["mlops", "train", "--dataset", identity.folder, "--fold", ",".join(str(f) for f in folds)]
    words += ["--configuration", configuration] if configuration else []
    words += ["--device", device] if device else []
    words += ["--gpus", str(gpus)] if gpus else []
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("dataset", "dataset.id", "dataset.name")]
    return shlex.join([*words, *kept, "--continue"])


@app.command()
@handle_errors
def validate(
    args: list[str] = typer.Argument(None, metavar="[OVERRIDES]...", help=common.overrides_help("train=cpu")),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
    fold: str = typer.Option(None, "--fold", "-f", help="Trained fold(s): 0-4, all, or a list 0,1 (train.fold)."),
    configuration: str = typer.Option(None, "--configuration", "-c", help="2d, 3d_fullres, ... (train.configuration)."),
    best: bool = typer.Option(False, "--best", help="Validate checkpoint_best.pth instead of checkpoint_final.pth."),
    npz: bool = typer.Option(False, "--npz", help="Keep the softmax .npz (find-best needs them to try ensembles)."),
    device: str = typer.Option(None, "--device", "-D", help=common.DEVICE_HELP + " (default: train.device)."),
) -> None:
    """nnU-Net's validation of trained folds (its `--val`): predict each fold's held-out cases and score them."""
    from mlops.train import validate as run_validate
    from mlops.workspace import parse_folds

    _, overrides = common.split_args(args, max_positional=0)
    selected = common.with_dataset(overrides, dataset)
    flags = {
        "train.configuration": configuration,
        "train.device": device,
        "train.save_probabilities": True if npz else None,
    }
    cfg = common.compose(selected, **flags)
    for f in parse_folds(fold if fold is not None else str(cfg.train.fold)):
        report, path = run_validate(common.compose(selected, **flags, **{"train.fold": str(f)}), best=best)
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        dice = ", ".join(f"{n} {fmt(v)}" for n, v in report.mean.items())
        common.out.print(f"Fold {f}: {report.num_cases} validation cases, Dice {dice}; report written to {path}")


@app.command("find-best")
@handle_errors
def find_best(
    args: list[str] = typer.Argument(
        None, metavar="[OVERRIDES]...", help=common.overrides_help("train.configuration=3d_fullres")
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
    configurations: str = typer.Option(
        None, "--configurations", "-c", help="Comma-separated configurations (default: every trained one)."
    ),
    folds: str = typer.Option(None, "--folds", "-f", help="Comma-separated folds (default: those validated in all)."),
    no_ensembles: bool = typer.Option(False, "--no-ensembles", help="Do not try ensembles of configurations."),
) -> None:
    """nnU-Net's find_best_configuration: best configuration (or ensemble) on the cross-validation, its
    post-processing, and inference instructions; `mlops predict`/`serve` then use that choice."""
    from mlops.best import find_best as run_find_best
    from mlops.workspace import parse_folds

    _, overrides = common.split_args(args, max_positional=0)
    cfg = common.compose(common.with_dataset(overrides, dataset))
    chosen_folds = None
    if folds is not None:
        chosen_folds = [f for f in parse_folds(folds) if f != "all"]
        if len(chosen_folds) != len(folds.split(",")) and "-" not in folds:
            raise ConfigError("--folds: find-best works on the cross-validation folds 0-4, not 'all'")
    configs = [c.strip() for c in configurations.split(",")] if configurations else None
    choice = run_find_best(cfg, configs, chosen_folds, ensembles=not no_ensembles)  # type: ignore[arg-type]
    table = Table(title=f"{choice.dataset}: cross-validation foreground Dice", title_justify="left")
    table.add_column("model or ensemble", overflow="fold")
    table.add_column("Dice", justify="right")
    for name, value in choice.all_results.items():
        table.add_row(name, f"{value:.4f}")
    common.out.print(table)
    common.out.print(f"Best: {', '.join(Path(d).name for d in choice.model_dirs)}, folds {choice.folds}")
    common.out.print(
        f"Post-processing: {escape(', '.join(choice.postprocessing_steps)) or 'none'} "
        f"(Dice {choice.dice_before_pp:.4f} -> {choice.dice_after_pp:.4f}); {choice.postprocessing}"
    )
    common.out.print(
        f"Inference instructions: {choice.instructions}; `mlops predict` and `mlops serve` now use this choice"
    )


def _label_names(cfg: Any, pred: Path, ref: Path) -> dict[int, str] | None:
    """Label names for `evaluate --pred --ref`: the prepared dataset's, else the trained model's (the one predict
    uses), else a dataset.json beside either folder; label values (label_1, ...) only when none is found."""
    from mlops import evaluate as ev
    from mlops.models import model_dir
    from mlops.workspace import prepared_dataset

    def prepared() -> Path:
        return prepared_dataset(cfg)[1] / "dataset.json"

    def model() -> Path:
        return model_dir(cfg) / "dataset.json"

    for where in (prepared, model, lambda: ref.parent / "dataset.json", lambda: pred.parent / "dataset.json"):
        try:
            path = where()
            if path.is_file():
                logger.info(f"Label names from {path}")
                return ev.labels_from_dataset_json(path)
        except MlopsError:
            continue
    logger.warning("no dataset.json found for label names (prepare the dataset or pass -d); using label values")
    return None


@app.command()
@handle_errors
def evaluate(
    args: list[str] = typer.Argument(
        None, metavar="[OVERRIDES]...", help=common.overrides_help("evaluate.output_dir=out")
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
    fold: str = typer.Option(None, "--fold", "-f", help="Score this fold's nnU-Net validation (default: train.fold)."),
    pred: Path = typer.Option(None, "--pred", help="Folder of predicted segmentations (with --ref)."),
    ref: Path = typer.Option(None, "--ref", help="Folder of reference labels with the same file names."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    hd95: bool = typer.Option(False, "--hd95", help="Also the 95% Hausdorff distance (mm; slower) with --pred/--ref."),
) -> None:
    """Per-label Dice of a fold's validation, or Dice, IoU, precision, recall, volume error (and HD95) per label and
    case of a prediction folder against references (cases without a prediction are left out with a warning)."""
    from mlops import evaluate as ev
    from mlops.train import validation_report
    from mlops.workspace import export_paths, parse_fold, prepared_dataset

    _, overrides = common.split_args(args, max_positional=0)
    cfg = common.compose(common.with_dataset(overrides, dataset), **{"train.fold": fold})
    if (pred is None) != (ref is None):
        raise ConfigError("--pred and --ref go together")
    export_paths(cfg)
    if pred is not None:
        report = ev.score_folders(pred, ref, _label_names(cfg, pred, ref), hd95=hd95)
        path = ev.write_report(report, Path(cfg.evaluate.output_dir), f"evaluate_{pred.name}_vs_{ref.name}")
    else:
        identity, pre_dir = prepared_dataset(cfg)
        report, path = validation_report(cfg, identity, pre_dir, parse_fold(cfg.train.fold))
    if as_json:
        common.out.print_json(report.to_json())
        return
    table = Table(title=f"Dice ({report.num_cases} cases)", title_justify="left")
    table.add_column("case")
    names = list(report.mean)
    for n in names:
        table.add_column(n, justify="right")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for row in report.per_case:
        table.add_row(row["case"], *(fmt(row["dice"][n]) for n in names))
    table.add_row("[bold]mean[/]", *(f"[bold]{fmt(report.mean[n])}[/]" for n in names), end_section=True)
    common.out.print(table)
    if report.metrics_mean:
        keys = list(next(iter(report.metrics_mean.values())))
        metrics = Table(title="Mean per label", title_justify="left")
        metrics.add_column("label")
        for k in keys:
            metrics.add_column(k, justify="right")
        for name, values in report.metrics_mean.items():
            metrics.add_row(name, *(fmt(values[k]) for k in keys))
        common.out.print(metrics)
    common.out.print(f"Foreground mean Dice {fmt(report.foreground_mean)}; report written to {path}")
