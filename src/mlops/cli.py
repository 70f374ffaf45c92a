"""The `mlops` command line: a thin Typer edge over the library.

Every command composes the Hydra configuration from its trailing ``key=value`` overrides. Library errors
(:class:`~mlops.errors.MlopsError`) become one red line on stderr and exit code 1; configuration mistakes are usage
errors (exit code 2). Results go to stdout, logs to stderr.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from loguru import logger
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlops import __version__
from mlops.config import load_config
from mlops.errors import ConfigError, MlopsError
from mlops.interrupts import sigterm_as_interrupt
from mlops.logs import intercept_stdlib_logging, setup_logging
from mlops.nnunet import TrainingInterrupted

app = typer.Typer(
    name="mlops",
    help="Medical Segmentation Decathlon -> nnU-Net v2: prepare, train, predict, serve, monitor.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def overrides_help(example: str) -> str:
    return f"Hydra overrides key=value of configs/, e.g. {example}."


OVERRIDES_HELP = overrides_help("dataset.id=621")
DATASET_HELP = "Dataset as nnU-Net takes it: id (4), folder (Dataset004_Hippocampus), name or config group (synthetic)."
DEVICE_HELP = "auto, cuda, cpu or mps (-D: -d is the dataset, as in nnU-Net)"


def _version(value: bool) -> None:
    if value:
        out.print(f"mlops {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs, including nnU-Net's own output."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Medical Segmentation Decathlon -> nnU-Net v2: prepare, train, predict, serve, monitor."""
    setup_logging(verbose)


def handle_errors(fn: F) -> F:
    """Turn library errors into one clear line and an exit code; no tracebacks for expected failures."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TrainingInterrupted as exc:
            err.print(f"[bold yellow]Interrupted:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except ConfigError as exc:
            err.print(f"[bold red]Usage error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except MlopsError as exc:
            err.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]Interrupted.[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def split_args(args: list[str] | None, max_positional: int = 1) -> tuple[list[str], list[str]]:
    """Separate positional arguments from trailing ``key=value`` overrides. A path that exists is a path, even with
    an ``=`` in its name (``run=1/a=b.nii.gz``); anything else with an ``=`` is an override."""
    positional = [a for a in args or [] if "=" not in a or Path(a).exists()]
    overrides = [a for a in args or [] if "=" in a and not Path(a).exists()]
    if len(positional) > max_positional:
        raise ConfigError(f"unexpected argument(s) {positional[max_positional:]}; overrides look like key=value")
    return positional, overrides


def compose(overrides: list[str], **extra: Any) -> DictConfig:
    """Compose the config; CLI flags (``extra``) are applied as overrides after the user's own."""
    flags = [f"{k}={_override_value(v)}" for k, v in extra.items() if v is not None]
    return load_config([*overrides, *flags])


def with_dataset(overrides: list[str], dataset: str | None) -> list[str]:
    """The user's overrides plus those selecting ``--dataset`` (resolved against the folders the config points to)."""
    if dataset is None:
        return overrides
    from mlops.config import config_dir
    from mlops.datasets import dataset_overrides

    return [*overrides, *dataset_overrides(dataset, load_config(overrides), overrides, config_dir())]


def _override_value(value: Any) -> str:
    """Quote strings and paths so spaces or Hydra grammar characters in them survive parsing."""
    if isinstance(value, str | Path):
        escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
        return f"'{escaped}'"
    return str(value)


@app.command()
@handle_errors
def synth(
    args: list[str] = typer.Argument(
        None,
        metavar="[OUT] [OVERRIDES]...",
        help="Output task folder; " + overrides_help("synth.num_train=32 synth.seed=1"),
    ),
    num_train: int = typer.Option(None, "--train", help="Training cases (default: synth.num_train)."),
    num_test: int = typer.Option(None, "--test", help="Test cases (default: synth.num_test)."),
    channels: int = typer.Option(None, "--channels", help="1 (3D task) or 2 (4D two-channel task)."),
    seed: int = typer.Option(None, "--seed", help="Random seed."),
    shift: float = typer.Option(None, "--shift", help="Scale test intensities by 1+SHIFT (deliberate drift)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
) -> None:
    """Generate a small synthetic Decathlon task (hippocampus-like, two labels) for demos and tests."""
    from mlops.synth import SynthSpec, generate_task

    positional, overrides = split_args(args)
    cfg = compose(
        overrides,
        **{
            "synth.output": positional[0] if positional else None,
            "synth.num_train": num_train,
            "synth.num_test": num_test,
            "synth.channels": channels,
            "synth.seed": seed,
            "synth.intensity_shift": shift,
        },
    )
    s = cfg.synth
    spec = SynthSpec(int(s.num_train), int(s.num_test), int(s.channels), int(s.seed), float(s.intensity_shift))
    path = generate_task(Path(s.output), spec, overwrite=force)
    out.print(f"Synthetic task written to [bold]{path}[/] (test labels in {path.name}_labelsTs beside it)")


@app.command()
@handle_errors
def download(
    args: list[str] = typer.Argument(None, metavar="[OVERRIDES]...", help=overrides_help("download.timeout_s=120")),
    url: str = typer.Option(None, "--url", help="Archive URL (default: dataset.url)."),
    dest: Path = typer.Option(None, "--dest", help="Where to save it (default: dataset.source)."),
) -> None:
    """Download the Decathlon task archive, verify its SHA-256, and save it where `mlops prepare` looks."""
    from mlops.download import download as fetch

    _, overrides = split_args(args, max_positional=0)
    cfg = compose(overrides, **{"dataset.url": url, "dataset.source": dest})
    if not cfg.dataset.get("url"):
        raise ConfigError("no URL configured for this dataset; pass --url or dataset.url=...")
    with sigterm_as_interrupt():
        path = fetch(
            str(cfg.dataset.url),
            Path(cfg.dataset.source),
            cfg.dataset.get("sha256"),
            timeout_s=float(cfg.download.timeout_s),
            chunk_bytes=int(cfg.download.chunk_bytes),
        )
    out.print(f"Downloaded [bold]{path}[/]")


@app.command()
@handle_errors
def prepare(
    args: list[str] = typer.Argument(
        None,
        metavar="[SOURCE] [OVERRIDES]...",
        help="Decathlon task folder or .tar (default: dataset.source); "
        + overrides_help("dataset.id=621 prepare.num_workers=4"),
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    force: bool = typer.Option(False, "--force", help="Redo conversion and preprocessing even if up to date."),
    workers: int = typer.Option(None, "--workers", "-j", help="Worker processes (default: prepare.num_workers)."),
) -> None:
    """Convert a Decathlon task to nnU-Net's raw layout, then run nnU-Net's fingerprinting, planning, preprocessing."""
    from mlops.prepare import prepare as run_prepare

    positional, overrides = split_args(args)
    overrides = with_dataset(overrides, dataset)
    cfg = compose(
        overrides,
        **{
            "dataset.source": positional[0] if positional else None,
            "prepare.force": True if force else None,
            "prepare.num_workers": workers,
        },
    )
    with sigterm_as_interrupt():
        result = run_prepare(cfg)
    table = Table(title=f"{result.dataset}", show_header=False, title_justify="left")
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")
    table.add_row("raw dataset", str(result.raw_dir))
    table.add_row("cases", f"{result.num_training} training, {result.num_test} test")
    table.add_row(
        "conversion",
        f"{result.conversion_s:.1f} s" if result.converted else f"up to date ({result.conversion_s:.2f} s)",
    )
    table.add_row("plans", str(result.plans_file))
    table.add_row(
        "preprocessing",
        f"{', '.join(result.preprocessed)} in {result.preprocessing_s:.1f} s" if result.preprocessed else "up to date",
    )
    table.add_row("preprocessed", str(result.preprocessed_dir))
    out.print(table)
    if not result.converted and not result.preprocessed:
        out.print(f"{result.dataset} is up to date; use --force to redo it.")
    logger.debug(f"prepare finished: {result}")


@app.command()
@handle_errors
def train(
    args: list[str] = typer.Argument(
        None, metavar="[OVERRIDES]...", help=overrides_help("train.epochs=5 wandb.mode=disabled")
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    fold: str = typer.Option(
        None, "--fold", "-f", help="0-4, all, or a list (0,1,2 / 0-4), trained one after another (default: train.fold)."
    ),
    configuration: str = typer.Option(None, "--configuration", "-c", help="2d, 3d_fullres, ... (train.configuration)."),
    device: str = typer.Option(None, "--device", "-D", help=DEVICE_HELP + " (default: train.device)."),
    gpus: int = typer.Option(None, "--gpus", help="Number of GPUs; >1 runs nnU-Net's DDP training."),
    resume: bool = typer.Option(False, "--continue", help="Resume each fold from its latest nnU-Net checkpoint."),
) -> None:
    """Train nnU-Net folds on the prepared dataset (nnU-Net's schedule by default; train=cpu for a CPU, train=quick
    for a seconds-long demo). Each fold is resumable on its own; Ctrl-C prints the exact command that resumes."""
    from mlops.train import parse_fold_list
    from mlops.train import train as run_train

    _, overrides = split_args(args, max_positional=0)
    selected = with_dataset(overrides, dataset)
    flags = {"train.configuration": configuration, "train.device": device, "train.gpus": gpus}
    cfg = compose(selected, **flags)
    folds = parse_fold_list(fold if fold is not None else str(cfg.train.fold))
    results = []
    for i, f in enumerate(folds):
        fold_cfg = compose(selected, **flags, **{"train.fold": str(f)})
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
        out.print(table)
    if len(results) > 1:
        out.print(f"Trained folds {','.join(str(f) for f in folds)}; `mlops find-best` picks the configuration.")


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

    from mlops.train import export_paths, prepared_dataset

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
    args: list[str] = typer.Argument(None, metavar="[OVERRIDES]...", help=overrides_help("train=cpu")),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    fold: str = typer.Option(None, "--fold", "-f", help="Trained fold(s): 0-4, all, or a list 0,1 (train.fold)."),
    configuration: str = typer.Option(None, "--configuration", "-c", help="2d, 3d_fullres, ... (train.configuration)."),
    best: bool = typer.Option(False, "--best", help="Validate checkpoint_best.pth instead of checkpoint_final.pth."),
    npz: bool = typer.Option(False, "--npz", help="Keep the softmax .npz (find-best needs them to try ensembles)."),
    device: str = typer.Option(None, "--device", "-D", help=DEVICE_HELP + " (default: train.device)."),
) -> None:
    """nnU-Net's validation of trained folds (its `--val`): predict each fold's held-out cases and score them."""
    from mlops.train import parse_fold_list
    from mlops.train import validate as run_validate

    _, overrides = split_args(args, max_positional=0)
    selected = with_dataset(overrides, dataset)
    flags = {
        "train.configuration": configuration,
        "train.device": device,
        "train.save_probabilities": True if npz else None,
    }
    cfg = compose(selected, **flags)
    for f in parse_fold_list(fold if fold is not None else str(cfg.train.fold)):
        report, path = run_validate(compose(selected, **flags, **{"train.fold": str(f)}), best=best)
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        dice = ", ".join(f"{n} {fmt(v)}" for n, v in report.mean.items())
        out.print(f"Fold {f}: {report.num_cases} validation cases, Dice {dice}; report written to {path}")


@app.command("find-best")
@handle_errors
def find_best(
    args: list[str] = typer.Argument(
        None, metavar="[OVERRIDES]...", help=overrides_help("train.configuration=3d_fullres")
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    configurations: str = typer.Option(
        None, "--configurations", "-c", help="Comma-separated configurations (default: every trained one)."
    ),
    folds: str = typer.Option(None, "--folds", "-f", help="Comma-separated folds (default: those validated in all)."),
    no_ensembles: bool = typer.Option(False, "--no-ensembles", help="Do not try ensembles of configurations."),
) -> None:
    """nnU-Net's find_best_configuration: best configuration (or ensemble) on the cross-validation, its
    post-processing, and inference instructions; `mlops predict`/`serve` then use that choice."""
    from mlops.best import find_best as run_find_best
    from mlops.train import parse_fold_list

    _, overrides = split_args(args, max_positional=0)
    cfg = compose(with_dataset(overrides, dataset))
    chosen_folds = None
    if folds is not None:
        chosen_folds = [f for f in parse_fold_list(folds) if f != "all"]
        if len(chosen_folds) != len(folds.split(",")) and "-" not in folds:
            raise ConfigError("--folds: find-best works on the cross-validation folds 0-4, not 'all'")
    configs = [c.strip() for c in configurations.split(",")] if configurations else None
    choice = run_find_best(cfg, configs, chosen_folds, ensembles=not no_ensembles)  # type: ignore[arg-type]
    table = Table(title=f"{choice.dataset}: cross-validation foreground Dice", title_justify="left")
    table.add_column("model or ensemble", overflow="fold")
    table.add_column("Dice", justify="right")
    for name, value in choice.all_results.items():
        table.add_row(name, f"{value:.4f}")
    out.print(table)
    out.print(f"Best: {', '.join(Path(d).name for d in choice.model_dirs)}, folds {choice.folds}")
    out.print(
        f"Post-processing: {escape(', '.join(choice.postprocessing_steps)) or 'none'} "
        f"(Dice {choice.dice_before_pp:.4f} -> {choice.dice_after_pp:.4f}); {choice.postprocessing}"
    )
    out.print(f"Inference instructions: {choice.instructions}; `mlops predict` and `mlops serve` now use this choice")


def _label_names(cfg: Any, pred: Path, ref: Path) -> dict[int, str] | None:
    """Label names for `evaluate --pred --ref`: the prepared dataset's, else the trained model's (the one predict
    uses), else a dataset.json beside either folder; label values (label_1, ...) only when none is found."""
    from mlops import evaluate as ev
    from mlops.predict import model_dir
    from mlops.train import prepared_dataset

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
    args: list[str] = typer.Argument(None, metavar="[OVERRIDES]...", help=overrides_help("evaluate.output_dir=out")),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    fold: str = typer.Option(None, "--fold", "-f", help="Score this fold's nnU-Net validation (default: train.fold)."),
    pred: Path = typer.Option(None, "--pred", help="Folder of predicted segmentations (with --ref)."),
    ref: Path = typer.Option(None, "--ref", help="Folder of reference labels with the same file names."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    hd95: bool = typer.Option(False, "--hd95", help="Also the 95% Hausdorff distance (mm; slower) with --pred/--ref."),
) -> None:
    """Per-label Dice of a fold's validation, or Dice, IoU, precision, recall, volume error (and HD95) per label and
    case of a prediction folder against references (cases without a prediction are left out with a warning)."""
    from mlops import evaluate as ev
    from mlops.train import export_paths, parse_fold, prepared_dataset, validation_report

    _, overrides = split_args(args, max_positional=0)
    cfg = compose(with_dataset(overrides, dataset), **{"train.fold": fold})
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
        out.print_json(report.to_json())
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
    out.print(table)
    if report.metrics_mean:
        keys = list(next(iter(report.metrics_mean.values())))
        metrics = Table(title="Mean per label", title_justify="left")
        metrics.add_column("label")
        for k in keys:
            metrics.add_column(k, justify="right")
        for name, values in report.metrics_mean.items():
            metrics.add_row(name, *(fmt(values[k]) for k in keys))
        out.print(metrics)
    out.print(f"Foreground mean Dice {fmt(report.foreground_mean)}; report written to {path}")


def model_choice(model: Path | None, folds: str | None) -> dict[str, str]:
    """``--folds`` as overrides (predict, serve); a model or folds chosen by hand turn find-best's choice off."""
    extra = {}
    if folds is not None:
        extra["predict.folds"] = "null" if folds == "auto" else "[" + folds + "]"
    if folds is not None or model is not None:
        extra["predict.best"] = "false"
    return extra


@app.command()
@handle_errors
def predict(
    args: list[str] = typer.Argument(
        None,
        metavar="INPUT [OVERRIDES]...",
        help="A .nii/.nii.gz file or a folder of them; "
        + overrides_help("predict.backend=openvino predict.max_batch=4"),
    ),
    output: Path = typer.Option(None, "--output", "-o", help="Output file (file input) or folder (folder input)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    model: Path = typer.Option(None, "--model", "-m", help="nnU-Net model folder (default: from the config)."),
    folds: str = typer.Option(None, "--folds", help="Comma-separated folds to ensemble, or 'auto' for all trained."),
    no_tta: bool = typer.Option(False, "--no-tta", help="Turn off mirroring test-time augmentation (faster)."),
    device: str = typer.Option(None, "--device", "-D", help=DEVICE_HELP + " (default: predict.device)."),
    as_json: bool = typer.Option(
        False, "--json", help="Print label volumes, output signals, seconds, labels, model, folds as JSON."
    ),
    preview: bool = typer.Option(False, "--preview", help="Also write a PNG of three slices beside each output."),
    save_probabilities: bool = typer.Option(
        False, "--save-probabilities", help="Also write <case>.npz (softmax) + .pkl, nnU-Net's layout."
    ),
) -> None:
    """Segment NIfTI volumes with the trained model; prints each label's volume in mm³."""
    import json

    from mlops.predict import predict as run_predict

    positional, overrides = split_args(args)
    if not positional:
        raise ConfigError("missing INPUT: a .nii/.nii.gz file or a folder of them")
    extra: dict[str, Any] = {"predict.device": device, "predict.tta": False if no_tta else None}
    extra.update(model_choice(model, folds))
    overrides = with_dataset(overrides, dataset)
    cfg = load_config([*overrides, *(f"{k}={v}" for k, v in extra.items() if v is not None)])
    results = run_predict(cfg, Path(positional[0]), output, model, save_probabilities=save_probabilities)
    previews = {}
    if preview:
        from mlops.preview import write_preview

        previews = {r.output: write_preview(r.input, r.output, r.labels, r.volumes_mm3) for r in results}
    if as_json:
        from mlops.volumes import label_names

        payload = [
            {
                "input": str(r.input), "output": str(r.output), "shape": r.shape, "volumes_mm3": r.volumes_mm3,
                "seconds": round(r.seconds, 3), "labels": label_names(r.labels),
                "model": r.model, "folds": r.folds, "signals": r.signals,
                **({"preview": str(previews[r.output])} if r.output in previews else {}),
            }
            for r in results
        ]  # fmt: skip
        out.print_json(json.dumps(payload))
        return
    names = list(results[0].volumes_mm3) if results else []
    table = Table(title="Label volumes (mm³)", title_justify="left")
    table.add_column("case")
    table.add_column("output", overflow="fold")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("s", justify="right")
    for r in results:
        case = r.input.name.split(".nii")[0]
        table.add_row(case, str(r.output), *(f"{r.volumes_mm3[n]:.1f}" for n in names), f"{r.seconds:.2f}")
    out.print(table)
    for png in previews.values():
        out.print(f"Preview written to {png}")


@app.command()
@handle_errors
def batch(
    args: list[str] = typer.Argument(
        None,
        metavar="SOURCE [OVERRIDES]...",
        help="Folder or fsspec prefix (gs://...) of NIfTI files, or a CSV/Parquet manifest; "
        + overrides_help("batch.actors=4 predict.tta=false"),
    ),
    output: str = typer.Option(..., "--output", "-o", help="Output folder or fsspec prefix (gs://...)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    model: str = typer.Option(
        None, "--model", "-m", help="nnU-Net model folder, or its URL (gs://...) fetched once per node."
    ),
    folds: str = typer.Option(None, "--folds", help="Comma-separated folds to ensemble, or 'auto' for all trained."),
    no_tta: bool = typer.Option(False, "--no-tta", help="Turn off mirroring test-time augmentation (faster)."),
    actors: int = typer.Option(None, "--actors", help="Segmenter actors (default: batch.actors)."),
    address: str = typer.Option(None, "--address", help="Ray cluster: auto or ray://host:10001 (batch.ray.address)."),
    force: bool = typer.Option(False, "--force", help="Redo cases already written by the same model."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON."),
) -> None:
    """Segment a cohort on Ray Data: every scan written under OUTPUT, plus volumes.parquet/.csv (one row a case)."""
    from mlops.batch import run_batch

    positional, overrides = split_args(args)
    if not positional:
        raise ConfigError("missing SOURCE: a folder or URL prefix of NIfTI files, or a .csv/.parquet manifest")
    flags = [] if folds is None else ["predict.folds=" + ("null" if folds == "auto" else f"[{folds}]")]
    if folds is not None or model is not None:
        flags.append("predict.best=false")  # a model or folds chosen by hand: find-best's choice does not apply
    overrides = with_dataset(overrides, dataset)
    cfg = compose(
        [*overrides, *flags],
        **{
            "predict.tta": False if no_tta else None,
            "batch.actors": actors,
            "batch.ray.address": address,
            "batch.force": True if force else None,
        },
    )
    with sigterm_as_interrupt():
        s = run_batch(cfg, positional[0], output, model)
    if as_json:
        import dataclasses
        import json

        out.print_json(json.dumps({**dataclasses.asdict(s), "cases_per_second": round(s.cases_per_second, 4)}))
    else:
        table = Table(title=f"Batch {s.run_id}", show_header=False, title_justify="left")
        table.add_column(overflow="fold")
        table.add_column(overflow="fold")
        table.add_row("cases", f"{s.cases}: {s.done} segmented, {s.skipped} skipped (done before), {s.failed} failed")
        table.add_row(
            "time", f"{s.seconds:.1f} s ({s.cases_per_second:.2f} cases/s); Ray start {s.ray_start_seconds:.1f} s"
        )
        table.add_row("model", s.model_sha256[:12])
        table.add_row("table", f"{s.table}\n{s.csv}")
        out.print(table)
    if s.failed:
        shown = "\n  - ".join(s.errors[:20]) + ("\n  - ..." if len(s.errors) > 20 else "")
        err.print(
            f"[bold red]Error:[/] {s.failed} of {s.cases} case(s) failed (each has its row and error in {s.csv}):"
            f"\n  - {shown}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


@app.command()
@handle_errors
def export(
    args: list[str] = typer.Argument(None, metavar="[OVERRIDES]...", help=overrides_help("predict.device=cpu")),
    model: Path = typer.Option(None, "--model", "-m", help="nnU-Net model folder (default: from the config)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    folds: str = typer.Option(None, "--folds", help="Comma-separated folds (default: every trained fold)."),
    formats: str = typer.Option("onnx,openvino", "--formats", help="Comma-separated: onnx, openvino."),
    check_cases: int = typer.Option(
        4, "--check-cases", min=0, help="Cases for the parity check that lets `auto` pick a faster path (0: none)."
    ),
    check_images: Path = typer.Option(
        None, "--check-images", help="Folder of images for the check (default: the fold's validation cases)."
    ),
) -> None:
    """Write the trained network as ONNX and OpenVINO IR beside each fold's checkpoint (faster CPU inference), then
    check every backend x precision this CPU runs against nnU-Net's own predictor on a few cases."""
    from mlops.inference.check import check_images as find_images
    from mlops.inference.check import load_check_cases, run_check
    from mlops.inference.export import export_model
    from mlops.nnunet import available_folds
    from mlops.predict import model_dir, parse_folds

    _, overrides = split_args(args, max_positional=0)
    cfg = compose(with_dataset(overrides, dataset))
    chosen = parse_folds(folds) if folds else None
    folder = model_dir(cfg, model)
    fold_list = chosen or available_folds(folder, str(cfg.predict.checkpoint))
    # Resolved before exporting, so a bad --check-images fails with nothing written.
    images = find_images(cfg, folder, fold_list[0], check_cases, check_images) if check_cases and fold_list else []
    exported = export_model(folder, chosen, str(cfg.predict.checkpoint), tuple(f.strip() for f in formats.split(",")))
    table = Table(title="Exported", title_justify="left")
    for col in ("fold", "folder", "files", "s"):
        table.add_column(col, overflow="fold")
    for e in exported:
        table.add_row(str(e.fold), str(e.folder), ", ".join(f.name for f in e.files), f"{e.seconds:.1f}")
    out.print(table)
    if check_cases <= 0:
        logger.info("No parity check (--check-cases 0): `auto` stays at fp32")
        return
    fold_list = [e.fold for e in exported]
    if not images:
        logger.warning("No parity check: `auto` stays at fp32 (give images with --check-images)")
        return
    p = cfg.predict
    channels = len(json.loads((folder / "dataset.json").read_text())["channel_names"])
    entry = run_check(folder, fold_list, str(p.checkpoint), load_check_cases(images, channels), tta=bool(p.tta),
                      tile_step_size=float(p.tile_step_size))  # fmt: skip
    table = Table(
        title=f"Parity against nnU-Net's predictor ({len(images)} case(s), {entry['nnunet_seconds_per_case']:.2f} "
        f"s/case, mirroring {'on' if entry['tta'] else 'off'}, {entry['cpu']})",
        title_justify="left",
    )
    for col in ("backend", "precision", "s/case", "x nnU-Net", "min Dice", "mean Dice", "max voxels differ", "passed"):
        table.add_column(col)
    for r in entry["results"]:
        table.add_row(r["backend"], r["precision"], f"{r['seconds_per_case']:.2f}", f"{r['speed_vs_nnunet']:.2f}",
                      f"{r['min_dice']:.4f}", f"{r['mean_dice']:.4f}", str(r["max_voxels_differ"]),
                      "yes" if r["passed"] else "[red]no[/]")  # fmt: skip
    out.print(table)


@app.command()
@handle_errors
def serve(
    args: list[str] = typer.Argument(
        None, metavar="[OVERRIDES]...", help=overrides_help("serve.max_in_flight=4 predict.tta=false")
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    model: Path = typer.Option(None, "--model", "-m", help="nnU-Net model folder (default: from the config)."),
    folds: str = typer.Option(None, "--folds", help="Comma-separated folds to ensemble, or 'auto' for all trained."),
    host: str = typer.Option(None, "--host", help="Interface (default: serve.host)."),
    port: int = typer.Option(None, "--port", help="Port (default: $PORT, else serve.port)."),
) -> None:
    """Run the segmentation API (FastAPI + uvicorn): POST /predict, /health, /ready, /metrics, /docs."""
    import sys

    from mlops.api import create_app, run_server
    from mlops.predict import load_segmenter, model_dir

    # The service never tracks to W&B; nnU-Net's logger imports wandb only to offer it, and importing wandb makes two
    # temporary folders (wandb-media, wandb-artifacts) that a killed container leaves behind. None: ImportError.
    sys.modules.setdefault("wandb", None)  # type: ignore[arg-type]
    _, overrides = split_args(args, max_positional=0)
    choice = [f"{k}={v}" for k, v in model_choice(model, folds).items()]
    cfg = compose([*with_dataset(overrides, dataset), *choice], **{"serve.host": host, "serve.port": port})
    factory = None
    if not cfg.serve.get("model_uri"):  # load here, not in uvicorn's start-up: no model is an error line and exit 1
        segmenter = load_segmenter(cfg, model_dir(cfg, model))
        factory = lambda: segmenter  # noqa: E731
    app_ = create_app(cfg, segmenter_factory=factory)
    intercept_stdlib_logging()
    run_server(app_, cfg)


@app.command()
@handle_errors
def drift(
    args: list[str] = typer.Argument(
        None,
        metavar="[SOURCE] [OVERRIDES]...",
        help="Decathlon task or nnU-Net raw dataset folder; "
        + overrides_help("drift.max_drift_share=0.2 monitor.min_samples=30"),
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=DATASET_HELP),
    current: str = typer.Option(None, "--current", help="test (the task's test images) or requests (served volumes)."),
    fail_on_drift: bool = typer.Option(
        False, "--fail-on-drift", help="Exit 2 if the verdict is drift or a case is outside the reference's range."
    ),
) -> None:
    """Drift report: test (or served) cases against the model's reference profile (or the training images)."""
    from mlops.drift import run_drift

    positional, overrides = split_args(args)
    overrides = with_dataset(overrides, dataset)
    cfg = compose(overrides, **{"drift.source": positional[0] if positional else None, "drift.current": current})
    summary = run_drift(cfg)
    table = Table(
        title=f"Drift of {summary.model}: {summary.current_rows} current vs {summary.reference_rows} reference cases",
        title_justify="left",
    )
    for col in ("statistic", "test", "p", "adjusted p", "shift (SD)", "drifted"):
        table.add_column(col)
    for c in summary.columns:
        mark = {"drifted": "[bold red]yes[/]", "small shift": "[yellow]small shift[/]"}.get(c.status, "no")
        table.add_row(c.column, c.test, f"{c.p_value:.2g}", f"{c.score:.2g}", c.shift_text, mark)
    out.print(table)
    out.print(f"[bold]Verdict: {summary.verdict}[/] ({summary.correction})", highlight=False)
    for line in summary.summary_lines:
        out.print(f"  - {line}", highlight=False, soft_wrap=True)
    out.print(
        f"Drift share {summary.drift_share:.2f} (limit {summary.max_drift_share:.2f}); report: {summary.html}; "
        f"summary: {summary.summary_file}; Evidently snapshot: {summary.snapshot or 'none'}",
        highlight=False,
        soft_wrap=True,
    )
    if fail_on_drift and summary.alarm:
        if summary.dataset_drift:
            err.print(f"[bold red]Drift:[/] {summary.drift_share:.2f} of statistics drifted: {summary.drifted_columns}")
        if summary.out_of_range:
            err.print(f"[bold red]Out of range:[/] {len(summary.cases_out_of_range)} case(s) outside the reference: "
                      f"{', '.join(summary.cases_out_of_range[:10])}", highlight=False)  # fmt: skip
        raise typer.Exit(2)


monitor_app = typer.Typer(help="Model monitoring without labels: the reference profile.", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("profile")
@handle_errors
def monitor_profile(
    args: list[str] = typer.Argument(None, metavar="[OVERRIDES]...", help=OVERRIDES_HELP),
    model: Path = typer.Option(None, "--model", "-m", help="nnU-Net model folder (default: from the config)."),
    source: Path = typer.Option(
        None, "--source", help="Training images: Decathlon task or nnU-Net raw dataset (default: the prepared one)."
    ),
) -> None:
    """Write the reference profile (training inputs, validation output signals) into the model folder."""
    from mlops.monitoring.profile import profile_model
    from mlops.predict import model_dir

    _, overrides = split_args(args, max_positional=0)
    cfg = compose(overrides)
    path = profile_model(cfg, model_dir(cfg, model), source)
    out.print(f"Reference profile written to {path}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
