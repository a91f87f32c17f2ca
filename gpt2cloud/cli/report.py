"""`gpt2cloud report`: a Markdown report of a run (estimate vs actual, scores, samples, plot)."""

from __future__ import annotations

from typing import Optional

import typer

from gpt2cloud.cli import completion


def report_command(
    run: str = typer.Argument(..., help="A registry run id (its fetched OUT dir) or an OUT dir with metrics.jsonl.",
                             autocompletion=completion.runs),
    out: Optional[str] = typer.Option(None, "--out", help="Markdown file to write (default: OUT/report.md); "
                                                          "the plot goes next to it as .png."),
    no_calibrate: bool = typer.Option(False, "--no-calibrate", help="Do not add the run's measured MFU "
                                                                    "to the user calibration file."),
):
    """Write a run report; a finished GPU run also calibrates `gpt2cloud estimate`."""
    from gpt2cloud.runs.report import write_report
    from gpt2cloud.runs.rundata import load_run

    path, plot = write_report(load_run(run), out, calibrate=not no_calibrate)
    typer.echo(str(path))
