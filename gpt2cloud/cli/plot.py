"""`gpt2cloud plot`: a run's training curves, throughput and spend as one PNG."""

from __future__ import annotations

from typing import Optional

import typer

from gpt2cloud.cli import completion


def plot_command(
    run: str = typer.Argument(..., help="A registry run id (its fetched OUT dir) or an OUT dir with metrics.jsonl.",
                             autocompletion=completion.runs),
    out: Optional[str] = typer.Option(None, "--out", help="PNG to write (default: OUT/plot.png)."),
    log_x: bool = typer.Option(False, "--log-x", help="Logarithmic token axis."),
):
    """Plot loss and HellaSwag against tokens, tokens/s and dollars against step."""
    from gpt2cloud.errors import UserError
    from gpt2cloud.runs.plot import plot_run
    from gpt2cloud.runs.rundata import load_run, run_estimate

    data = load_run(run)
    if not data.train:
        raise UserError(f"{data.out_dir}/metrics.jsonl has no training steps yet; nothing to plot")
    estimate, _ = run_estimate(data)
    path = plot_run(data, out or data.out_dir / "plot.png", log_x=log_x, estimate=estimate)
    typer.echo(str(path))
