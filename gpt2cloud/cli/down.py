"""`gpt2cloud down RUN`: stop a run and everything that bills for it (cluster, managed job, local tree);
`--graceful` lets the trainer checkpoint and the node push it first; `--controller` removes SkyPilot's
managed-jobs controller, which a spot run leaves behind."""

from __future__ import annotations

from typing import Optional

import typer

from gpt2cloud.cli import completion
from gpt2cloud.cli.output import print_json


def down_command(
    run: Optional[str] = typer.Argument(None, help="Run id (see `gpt2cloud runs`); may be left out with --controller.",
                                        autocompletion=completion.runs),
    graceful: bool = typer.Option(False, "--graceful", help="First let the trainer stop with a checkpoint and the "
                                  "node push it (a stop request through the bucket), wait for the job to end (at "
                                  "most --wait-minutes), then tear down."),
    wait_minutes: Optional[float] = typer.Option(None, "--wait-minutes", help="With --graceful: the longest wait "
                                                 "before the plain teardown (default: one push interval, two steps, "
                                                 "the checkpoint and its final push, and 2 min)."),
    controller: bool = typer.Option(False, "--controller", help="Also tear down SkyPilot's managed-jobs controller "
                                    "(it outlives spot runs, and its disk bills); refused while any managed job is "
                                    "live."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Tear down a run's cluster, cancel its managed job, or kill its local process tree; with --graceful,
    after the trainer's last checkpoint is in the bucket."""
    from gpt2cloud import home
    from gpt2cloud.errors import UserError, positive
    from gpt2cloud.runs.logs import MAX_WAIT_MINUTES, remove_controller, stop_run

    if run is None and not controller:
        raise UserError("down: name the RUN to stop (`gpt2cloud runs` lists them), or --controller for SkyPilot's "
                        "jobs controller")
    if (graceful or wait_minutes is not None) and run is None:
        raise UserError("down --graceful: name the RUN to stop")
    if wait_minutes is not None and not graceful:
        raise UserError(f"--wait-minutes {wait_minutes:g}: it bounds --graceful's wait; add --graceful")
    positive("--wait-minutes", wait_minutes, "10", upper=MAX_WAIT_MINUTES)
    # Only readable: what bills is stopped first; a record that cannot be updated then is a note, not a
    # reason to leave a cluster running.
    home.check_usable(write=False)
    say = lambda line: typer.echo(line, err=True)  # noqa: E731 - progress of a graceful wait, beside the result
    r = stop_run(run, graceful=graceful, wait_minutes=wait_minutes, say=say) if run is not None else {}
    if run is not None and not as_json:  # said before the controller's part, which may refuse
        typer.echo(f"{run}: {r['action']}; checkpoints stay in {r['run_url']} (`gpt2cloud fetch {run}`)")
        if r.get("may_lose"):
            typer.echo(f"{run}: may have lost {r['may_lose']}", err=True)
        if r.get("note"):
            typer.echo(f"note: {r['note']}", err=True)
    refused = None
    if controller:
        try:
            r["controller"] = remove_controller()
        except UserError as e:  # the run's part is done and said; the refusal is the command's error
            refused = e
    if as_json:
        print_json({**r, **({"controller_error": str(refused)} if refused else {})})
    elif controller and refused is None:
        typer.echo(f"controller: {r['controller']}")
    if refused is not None:
        raise refused
