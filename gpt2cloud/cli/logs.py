"""`gpt2cloud logs RUN [--follow]`: the run's console output (SkyPilot's job log, or the local node's)."""

from __future__ import annotations

import typer

from gpt2cloud.cli import completion


def logs_command(
    run: str = typer.Argument(..., help="Run id (see `gpt2cloud runs`).", autocompletion=completion.runs),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the run ends."),
):
    """Print a run's console output; --follow streams it until the run ends."""
    from gpt2cloud import home
    from gpt2cloud.runs.logs import show_logs

    home.check_usable(write=False)
    code = show_logs(run, follow)
    if code:
        raise typer.Exit(code if isinstance(code, int) and 0 < code < 256 else 1)
