"""`gpt2cloud down RUN`: stop a run and everything that bills for it (cluster, managed job, local tree)."""

from __future__ import annotations

import typer

from gpt2cloud.cli.output import print_json


def down_command(
    run: str = typer.Argument(..., help="Run id (see `gpt2cloud runs`)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Tear down a run's cluster, cancel its managed job, or kill its local process tree."""
    from gpt2cloud import home
    from gpt2cloud.runs.logs import stop_run

    # Only readable: what bills is stopped first; a record that cannot be updated then is a note, not a
    # reason to leave a cluster running.
    home.check_usable(write=False)
    r = stop_run(run)
    if as_json:
        print_json(r)
        return
    typer.echo(f"{run}: {r['action']}; checkpoints stay in {r['run_url']} (`gpt2cloud fetch {run}`)")
    if r.get("note"):
        typer.echo(f"note: {r['note']}", err=True)
