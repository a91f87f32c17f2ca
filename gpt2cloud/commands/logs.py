"""`gpt2cloud logs RUN [--follow]`: the run's console output (SkyPilot's job log, or the local node's)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer


def _follow_file(path: Path, still_running, poll: float = 0.5) -> None:
    """Print path, then what is appended to it, until still_running() is False and nothing is left."""
    with open(path, "rb") as f:
        while True:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
                continue
            if not still_running():
                return
            time.sleep(poll)


def _from_bucket(record) -> bool:
    """Print the node logs the pusher put in the bucket; False if there are none."""
    from gpt2cloud.storage import StorageError, open_store

    try:
        store = open_store(record.run_url)
        keys = sorted(o.key for o in store.list("logs/") if o.key.endswith(".log"))
        for key in keys:
            if len(keys) > 1:
                sys.stdout.write(f"==> {store.url_for(key)} <==\n")
            sys.stdout.write(store.get_bytes(key).decode("utf-8", "replace"))
    except StorageError:
        return False
    return bool(keys)


def logs_command(
    run: str = typer.Argument(..., help="Run id (see `gpt2cloud runs`)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the run ends."),
):
    """Print a run's console output; --follow streams it until the run ends."""
    from gpt2cloud import registry
    from gpt2cloud.errors import UserError

    record = registry.get(run)
    if record.kind == "local":
        from gpt2cloud import local_runner

        d = record.node_dir
        log = d / "driver.log"
        if not log.is_file():
            if _from_bucket(record):
                return
            raise UserError(f"run '{run}' has no local log at {log} and none in {record.run_url}/logs/")
        _follow_file(log, lambda: follow and local_runner.state(d) == "RUNNING")
        return

    from gpt2cloud import clouds, sky_sdk

    try:
        with clouds.sky_errors(f"logs {run}", infra=record.infra):
            if record.kind == "managed-job":
                if record.job_id is None:
                    raise UserError(f"run '{run}' has no managed job id (its launch did not finish)")
                code = sky_sdk.tail_managed_logs(record.job_id, follow)
            else:
                code = sky_sdk.tail_logs(record.cluster or record.run_id, record.job_id, follow)
    except UserError as e:
        # The cluster is gone (autostop down after the run): the pusher's copy in the bucket remains.
        if _from_bucket(record):
            typer.echo(f"(from the bucket: {e})", err=True)
            return
        raise
    if code:
        raise typer.Exit(code if isinstance(code, int) and 0 < code < 256 else 1)
