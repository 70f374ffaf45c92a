"""Inference commands: `mlops predict`, `batch`, `export` and `serve`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from loguru import logger
from rich.table import Table

from mlops.cli import common
from mlops.cli.common import app, handle_errors
from mlops.config import load_config
from mlops.errors import ConfigError
from mlops.interrupts import sigterm_as_interrupt
from mlops.logs import intercept_stdlib_logging


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
        + common.overrides_help("predict.backend=openvino predict.max_batch=4"),
    ),
    output: Path = typer.Option(None, "--output", "-o", help="Output file (file input) or folder (folder input)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
    model: Path = typer.Option(None, "--model", "-m", help="nnU-Net model folder (default: from the config)."),
    folds: str = typer.Option(None, "--folds", help="Comma-separated folds to ensemble, or 'auto' for all trained."),
    no_tta: bool = typer.Option(False, "--no-tta", help="Turn off mirroring test-time augmentation (faster)."),
    device: str = typer.Option(None, "--device", "-D", help=common.DEVICE_HELP + " (default: predict.device)."),
    as_json: bool = typer.Option(
        False, "--json", help="Print label volumes, output signals, seconds, labels, model, folds as JSON."
    ),
    preview: bool = typer.Option(False, "--preview", help="Also write a PNG of three slices beside each output."),
    save_probabilities: bool = typer.Option(
        False, "--save-probabilities", help="Also write <case>.npz (softmax) + .pkl, nnU-Net's layout."
    ),
    output_type: str = typer.Option(
        "auto",
        "--output-type",
        "-t",
        help="nifti, dicom-seg or both (DICOM input); auto: dicom-seg for a DICOM series, nifti for NIfTI.",
    ),
    series: str = typer.Option(None, "--series", help="SeriesInstanceUID to segment when the input holds several."),
    store: bool = typer.Option(False, "--store", help="dicomweb:// input: store the SEG back to that PACS (STOW-RS)."),
) -> None:
    """Segment NIfTI volumes or a DICOM series (folder, .zip, dicomweb:// URL); prints each label's volume in mm³."""
    import json

    from mlops.predict import predict as run_predict

    positional, overrides = common.split_args(args)
    if not positional:
        raise ConfigError("missing INPUT: a .nii/.nii.gz file or a folder of them, or a DICOM series")
    extra: dict[str, Any] = {"predict.device": device, "predict.tta": False if no_tta else None}
    extra.update(model_choice(model, folds))
    overrides = common.with_dataset(overrides, dataset)
    cfg = load_config([*overrides, *(f"{k}={v}" for k, v in extra.items() if v is not None)])
    from mlops.predict_dicom import is_dicom_source

    if is_dicom_source(positional[0], int(cfg.dicom.max_files)):
        predict_dicom(cfg, positional[0], output, model, output_type, series, store, as_json)
        return
    if output_type not in ("auto", "nifti") or series is not None or store:
        raise ConfigError(
            f"{positional[0]}: --output-type {output_type}, --series and --store need a DICOM series as INPUT (a "
            "folder of DICOM files, a .zip of them, or a dicomweb:// URL): a SEG references the images it segments"
        )
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
        common.out.print_json(json.dumps(payload))
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
    common.out.print(table)
    for png in previews.values():
        common.out.print(f"Preview written to {png}")


def predict_dicom(
    cfg: Any,
    source: str,
    output: Path | None,
    model: Path | None,
    output_type: str,
    series: str | None,
    store: bool,
    as_json: bool,
) -> None:
    """`mlops predict` on a DICOM series: the SEG and/or NIfTI written (and stored), then the volumes."""
    from mlops.predict_dicom import predict_series

    r = predict_series(cfg, source, output, model, output_type, series, store)
    if as_json:
        payload = {
            "input": r.input, "series_uid": r.series_uid, "outputs": [str(p) for p in r.outputs],
            "seg_series_uid": r.seg_series_uid, "seg_sop_instance_uid": r.seg_sop_uid, "stored": r.stored,
            "shape": r.shape, "volumes_mm3": r.volumes_mm3, "seconds": {k: round(v, 3) for k, v in r.seconds.items()},
            "model": r.model, "folds": r.folds,
        }  # fmt: skip
        common.out.print_json(json.dumps(payload))
        return
    common.out.print(f"Series {r.series_uid} ({'x'.join(str(n) for n in r.shape)} voxels)", highlight=False)
    table = Table(title="Label volumes (mm³)", title_justify="left")
    for n in r.volumes_mm3:
        table.add_column(n, justify="right")
    table.add_column("s", justify="right")
    table.add_row(*(f"{v:.1f}" for v in r.volumes_mm3.values()), f"{sum(r.seconds.values()):.2f}")
    common.out.print(table)
    for path in r.outputs:
        common.out.print(f"Written: {path}", soft_wrap=True, highlight=False)
    if r.stored:
        common.out.print(f"Stored: {r.stored}", soft_wrap=True, highlight=False)  # a URL to copy: never folded


@app.command()
@handle_errors
def batch(
    args: list[str] = typer.Argument(
        None,
        metavar="SOURCE [OVERRIDES]...",
        help="Folder or fsspec prefix (gs://...) of NIfTI files, or a CSV/Parquet manifest; "
        + common.overrides_help("batch.actors=4 predict.tta=false"),
    ),
    output: str = typer.Option(..., "--output", "-o", help="Output folder or fsspec prefix (gs://...)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
    model: str = typer.Option(
        None, "--model", "-m", help="nnU-Net model folder, or its URL (gs://...) fetched once per node."
    ),
    folds: str = typer.Option(None, "--folds", help="Comma-separated folds to ensemble, or 'auto' for all trained."),
    no_tta: bool = typer.Option(False, "--no-tta", help="Turn off mirroring test-time augmentation (faster)."),
    actors: int = typer.Option(None, "--actors", help="Segmenter actors (default: batch.actors)."),
    address: str = typer.Option(None, "--address", help="Ray: auto, HOST:PORT, ray://HOST:10001 (batch.ray.address)."),
    force: bool = typer.Option(False, "--force", help="Redo cases already written by the same model."),
    as_json: bool = typer.Option(False, "--json", help="Print the run's summary as JSON."),
) -> None:
    """Segment a cohort on Ray Data: every scan written under OUTPUT, plus volumes.parquet/.csv (one row a case)."""
    from mlops.batch import run_batch

    positional, overrides = common.split_args(args)
    if not positional:
        raise ConfigError("missing SOURCE: a folder or URL prefix of NIfTI files, or a .csv/.parquet manifest")
    flags = [] if folds is None else ["predict.folds=" + ("null" if folds == "auto" else f"[{folds}]")]
    if folds is not None or model is not None:
        flags.append("predict.best=false")  # a model or folds chosen by hand: find-best's choice does not apply
    overrides = common.with_dataset(overrides, dataset)
    cfg = common.compose(
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

        common.out.print_json(json.dumps({**dataclasses.asdict(s), "cases_per_second": round(s.cases_per_second, 4)}))
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
        common.out.print(table)
    if s.failed:
        shown = "\n  - ".join(s.errors[:20]) + ("\n  - ..." if len(s.errors) > 20 else "")
        common.err.print(
            f"[bold red]Error:[/] {s.failed} of {s.cases} case(s) failed (each has its row and error in {s.csv}):"
            f"\n  - {shown}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


@app.command()
@handle_errors
def export(
    args: list[str] = typer.Argument(None, metavar="[OVERRIDES]...", help=common.overrides_help("predict.device=cpu")),
    model: Path = typer.Option(None, "--model", "-m", help="nnU-Net model folder (default: from the config)."),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
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
    from mlops.models import model_dir
    from mlops.workspace import available_folds, parse_folds

    _, overrides = common.split_args(args, max_positional=0)
    cfg = common.compose(common.with_dataset(overrides, dataset))
    chosen = parse_folds(folds, "--folds") if folds else None
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
    common.out.print(table)
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
    common.out.print(table)


@app.command()
@handle_errors
def serve(
    args: list[str] = typer.Argument(
        None, metavar="[OVERRIDES]...", help=common.overrides_help("serve.max_in_flight=4 predict.tta=false")
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
    model: Path = typer.Option(None, "--model", "-m", help="nnU-Net model folder (default: from the config)."),
    folds: str = typer.Option(None, "--folds", help="Comma-separated folds to ensemble, or 'auto' for all trained."),
    host: str = typer.Option(None, "--host", help="Interface (default: serve.host)."),
    port: int = typer.Option(None, "--port", help="Port (default: $PORT, else serve.port)."),
) -> None:
    """Run the segmentation API (FastAPI + uvicorn): POST /predict, /health, /ready, /metrics, /docs."""
    import sys

    from mlops.api import create_app, fetch_model
    from mlops.models import model_dir
    from mlops.pipeline import load_segmenter
    from mlops.service.server import run_server

    # The service never tracks to W&B; nnU-Net's logger imports wandb only to offer it, and importing wandb makes two
    # temporary folders (wandb-media, wandb-artifacts) that a killed container leaves behind. None: ImportError.
    sys.modules.setdefault("wandb", None)  # type: ignore[arg-type]
    _, overrides = common.split_args(args, max_positional=0)
    choice = [f"{k}={v}" for k, v in model_choice(model, folds).items()]
    cfg = common.compose(
        [*common.with_dataset(overrides, dataset), *choice], **{"serve.host": host, "serve.port": port}
    )
    # Fetch and load here, not in uvicorn's start-up: a missing or unreachable model is one line and exit 1.
    folder = fetch_model(cfg) if cfg.serve.get("model_uri") else model_dir(cfg, model)
    segmenter = load_segmenter(cfg, folder)
    app_ = create_app(cfg, segmenter_factory=lambda: segmenter)
    intercept_stdlib_logging()
    run_server(app_, cfg)
