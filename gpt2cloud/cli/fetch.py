"""`gpt2cloud fetch RUN|URL`: checkpoints, metrics and logs from a run's bucket, every sha256 verified."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gpt2cloud.cli import completion
from gpt2cloud.cli.output import print_json
from gpt2cloud.errors import UserError


def fetch_command(
    run: str = typer.Argument(..., help="Run id (see `gpt2cloud runs`) or the run's bucket URL (<bucket>/<run>).",
                             autocompletion=completion.runs),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Local directory (default: runs/RUN): new, empty, or this run's earlier fetch (resumed)."),
    latest: bool = typer.Option(False, "--latest", help="The newest complete checkpoint (the default)."),
    step: Optional[int] = typer.Option(None, "--step", help="The checkpoint of this step."),
    all_: bool = typer.Option(False, "--all", help="Every complete checkpoint in the bucket."),
    logs: bool = typer.Option(False, "--logs", help="Also the nodes' console logs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Download a run's checkpoint(s), metrics and logs; every file is verified, a rerun resumes."""
    from gpt2cloud.runs.fetch import fetch

    if sum([latest, step is not None, all_]) > 1:
        raise UserError("choose one of --latest, --step N and --all")
    out = fetch(run, dest, step=step, all_=all_, logs=logs)
    if as_json:
        print_json(out)
        return
    if out["checkpoint"]:
        typer.echo(f"checkpoint: {out['checkpoint']}  (all files sha256-verified)")
        typer.echo(f"  talk to it: gpt2cloud sample {out['checkpoint']}")
    else:
        typer.echo(f"no complete checkpoint in {out['url']} yet")
    if out["metrics"]:
        typer.echo(f"metrics:    {out['metrics']}")
    for p in out["logs"]:
        typer.echo(f"log:        {p}")
