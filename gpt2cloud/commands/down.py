"""`gpt2cloud down RUN`: stop a run and everything that bills for it (cluster, managed job, local tree)."""

from __future__ import annotations

import typer


def down_command(
    run: str = typer.Argument(..., help="Run id (see `gpt2cloud runs`)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Tear down a run's cluster, cancel its managed job, or kill its local process tree."""
    from gpt2cloud import registry
    from gpt2cloud.cli import print_json
    from gpt2cloud.errors import UserError

    record = registry.get(run)
    if record.kind == "local":
        from gpt2cloud import local_runner

        was_running = local_runner.stop(record)
        what = "killed its local process tree" if was_running else "it was not running"
    else:
        from gpt2cloud import clouds, sky_sdk

        try:
            with clouds.sky_errors(f"down {run}", infra=record.infra):
                if record.kind == "managed-job":
                    if record.job_id is None:
                        raise UserError(f"run '{run}' has no managed job id; check `sky jobs queue` and cancel "
                                        "it there")
                    sky_sdk.cancel_managed_job(record.job_id)
                    what = f"cancelled managed job {record.job_id} (SkyPilot tears its cluster down)"
                else:
                    sky_sdk.down(record.cluster or record.run_id)
                    what = f"tore down cluster {record.cluster or record.run_id}"
        except UserError as e:
            if "no longer exists" not in str(e):
                raise
            what = "its cluster was already gone"
    registry.note(record, f"down: {what}", state="DOWN")
    if as_json:
        print_json({"run": run, "state": "DOWN", "action": what, "run_url": record.run_url})
    else:
        typer.echo(f"{run}: {what}; checkpoints stay in {record.run_url} (`gpt2cloud fetch {run}`)")
