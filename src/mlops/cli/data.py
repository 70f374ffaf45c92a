"""Data commands: `mlops synth`, `download` and `prepare`."""

from __future__ import annotations

from pathlib import Path

import typer
from loguru import logger
from rich.table import Table

from mlops.cli import common
from mlops.cli.common import app, handle_errors
from mlops.errors import ConfigError
from mlops.interrupts import sigterm_as_interrupt


@app.command()
@handle_errors
def synth(
    args: list[str] = typer.Argument(
        None,
        metavar="[OUT] [OVERRIDES]...",
        help="Output task folder; " + common.overrides_help("synth.num_train=32 synth.seed=1"),
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

    positional, overrides = common.split_args(args)
    cfg = common.compose(
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
    common.out.print(f"Synthetic task written to [bold]{path}[/] (test labels in {path.name}_labelsTs beside it)")


@app.command()
@handle_errors
def download(
    args: list[str] = typer.Argument(
        None, metavar="[OVERRIDES]...", help=common.overrides_help("download.timeout_s=120")
    ),
    url: str = typer.Option(None, "--url", help="Archive URL (default: dataset.url)."),
    dest: Path = typer.Option(None, "--dest", help="Where to save it (default: dataset.source)."),
) -> None:
    """Download the Decathlon task archive, verify its SHA-256, and save it where `mlops prepare` looks."""
    from mlops.download import download as fetch

    _, overrides = common.split_args(args, max_positional=0)
    cfg = common.compose(overrides, **{"dataset.url": url, "dataset.source": dest})
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
    common.out.print(f"Downloaded [bold]{path}[/]")


@app.command()
@handle_errors
def prepare(
    args: list[str] = typer.Argument(
        None,
        metavar="[SOURCE] [OVERRIDES]...",
        help="Decathlon task folder or .tar (default: dataset.source); "
        + common.overrides_help("dataset.id=621 prepare.num_workers=4"),
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
    force: bool = typer.Option(False, "--force", help="Redo conversion and preprocessing even if up to date."),
    workers: int = typer.Option(None, "--workers", "-j", help="Worker processes (default: prepare.num_workers)."),
) -> None:
    """Convert a Decathlon task to nnU-Net's raw layout, then run nnU-Net's fingerprinting, planning, preprocessing."""
    from mlops.prepare import prepare as run_prepare

    positional, overrides = common.split_args(args)
    overrides = common.with_dataset(overrides, dataset)
    cfg = common.compose(
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
    common.out.print(table)
    if not result.converted and not result.preprocessed:
        common.out.print(f"{result.dataset} is up to date; use --force to redo it.")
    logger.debug(f"prepare finished: {result}")


@app.command("to-dicom")
@handle_errors
def to_dicom(
    source: Path = typer.Argument(..., help="A 3D .nii/.nii.gz scan."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the series (IM_00001.dcm, ...); new or empty."),
    modality: str = typer.Option("MR", "--modality", help="MR or CT."),
    patient_id: str = typer.Option("MLOPS-TEST", "--patient-id", help="PatientID written (a placeholder)."),
    store: str = typer.Option(
        None,
        "--store",
        help="Also store the series (STOW-RS) in this DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web.",
    ),
) -> None:
    """Write a NIfTI scan as a DICOM series (to try the PACS workflow); prints its dicomweb:// URL when stored."""
    from mlops.dicom import web
    from mlops.dicom.convert import series_from_nifti, write_series
    from mlops.volumes import InputError, load_nifti

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"{output}: exists and is not an empty folder; give a new folder for the series", 400)
    datasets = series_from_nifti(load_nifti(source), patient_id, modality, f"{source.name} (mlops to-dicom)")
    write_series(datasets, output)
    common.out.print(f"Wrote {len(datasets)} images of series {datasets[0].SeriesInstanceUID} to {output}")
    if store:
        root = store.rstrip("/")
        web.store(root, datasets)
        ref = web.SeriesRef(root, str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID))
        common.out.print(f"Stored in {root}:\n{ref.url}", highlight=False, soft_wrap=True)
