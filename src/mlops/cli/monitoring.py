"""Monitoring commands: `mlops drift` and `mlops monitor profile`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from mlops.cli import common
from mlops.cli.common import app, handle_errors


@app.command()
@handle_errors
def drift(
    args: list[str] = typer.Argument(
        None,
        metavar="[SOURCE] [OVERRIDES]...",
        help="Decathlon task or nnU-Net raw dataset folder; "
        + common.overrides_help("drift.max_drift_share=0.2 monitor.min_samples=30"),
    ),
    dataset: str = typer.Option(None, "--dataset", "-d", help=common.DATASET_HELP),
    current: str = typer.Option(None, "--current", help="test (the task's test images) or requests (served volumes)."),
    fail_on_drift: bool = typer.Option(
        False, "--fail-on-drift", help="Exit 2 if the verdict is drift or a case is outside the reference's range."
    ),
) -> None:
    """Drift report: test (or served) cases against the model's reference profile (or the training images)."""
    from mlops.drift import run_drift

    positional, overrides = common.split_args(args)
    overrides = common.with_dataset(overrides, dataset)
    cfg = common.compose(overrides, **{"drift.source": positional[0] if positional else None, "drift.current": current})
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
    common.out.print(table)
    common.out.print(f"[bold]Verdict: {summary.verdict}[/] ({summary.correction})", highlight=False)
    for line in summary.summary_lines:
        common.out.print(f"  - {line}", highlight=False, soft_wrap=True)
    common.out.print(
        f"Drift share {summary.drift_share:.2f} (limit {summary.max_drift_share:.2f}); report: {summary.html}; "
        f"summary: {summary.summary_file}; Evidently snapshot: {summary.snapshot or 'none'}",
        highlight=False,
        soft_wrap=True,
    )
    if fail_on_drift and summary.alarm:
        if summary.dataset_drift:
            common.err.print(
                f"[bold red]Drift:[/] {summary.drift_share:.2f} of statistics drifted: {summary.drifted_columns}"
            )
        if summary.out_of_range:
            cases = summary.cases_out_of_range
            common.err.print(
                f"[bold red]Out of range:[/] {len(cases)} case(s) outside the reference: {', '.join(cases[:10])}",
                highlight=False,
            )
        raise typer.Exit(2)


monitor_app = typer.Typer(help="Model monitoring without labels: the reference profile.", no_args_is_help=True)
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("profile")
@handle_errors
def monitor_profile(
    args: list[str] = typer.Argument(None, metavar="[OVERRIDES]...", help=common.OVERRIDES_HELP),
    model: Path = typer.Option(None, "--model", "-m", help="nnU-Net model folder (default: from the config)."),
    source: Path = typer.Option(
        None, "--source", help="Training images: Decathlon task or nnU-Net raw dataset (default: the prepared one)."
    ),
) -> None:
    """Write the reference profile (training inputs, validation output signals) into the model folder."""
    from mlops.models import model_dir
    from mlops.monitoring.profile import profile_model

    _, overrides = common.split_args(args, max_positional=0)
    cfg = common.compose(overrides)
    path = profile_model(cfg, model_dir(cfg, model), source)
    common.out.print(f"Reference profile written to {path}")
