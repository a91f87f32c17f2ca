"""`gpt2cloud logs` and `down`: a run's console output, and stopping everything that bills for it."""

from __future__ import annotations

import sys

from gpt2cloud.backends import backend_for
from gpt2cloud.errors import UserError
from gpt2cloud.names import DOWN
from gpt2cloud.runs import registry
from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import LOGS

# How the backends' stop() ends when nothing was there to stop (see backends/*.py)
NOTHING_TO_STOP = ("it was not running", "its cluster was already gone", "(SkyPilot's jobs controller is not up)",
                   "was in progress")


def print_bucket_logs(run_url: str) -> bool:
    """Print the node logs the pusher put in the bucket; False if there are none."""
    try:
        store = open_store(run_url)
        keys = sorted(o.key for o in store.list(f"{LOGS}/") if o.key.endswith(".log"))
        for key in keys:
            if len(keys) > 1:
                sys.stdout.write(f"==> {store.url_for(key)} <==\n")
            sys.stdout.write(store.get_bytes(key).decode("utf-8", "replace"))
    except StorageError:
        return False
    return bool(keys)


def show_logs(run_id: str, follow: bool) -> int:
    """Print the run's console output from its backend, else the copy in its bucket; the exit code."""
    record = registry.get(run_id)
    try:
        return backend_for(record.spec.kind).logs(record, follow)
    except UserError as e:
        # The cluster is gone (autostop down after the run): the pusher's copy in the bucket remains.
        if print_bucket_logs(record.spec.run_url):
            print(f"(from the bucket: {e})", file=sys.stderr)
            return 0
        raise UserError(f"{e}; and there are no logs in {record.spec.run_url}/{LOGS}/ yet") from None


def stop_run(run_id: str) -> dict:
    """Stop the run's cluster, managed job or local process tree; the bucket keeps its checkpoints.

    A run whose record is missing or damaged is stopped all the same (found from what exists); no record
    is written for it then (a damaged one stays as it is)."""
    record = registry.get(run_id)
    was_down = record.state == DOWN
    what = backend_for(record.spec.kind).stop(record)
    unrecorded = None
    if not (was_down and what.endswith(NOTHING_TO_STOP)):  # a rerun of `down` changes nothing
        try:
            registry.note(record, f"down: {what}", state=DOWN)
        except (UserError, OSError) as e:  # stopped all the same: say the record still shows the old state
            unrecorded = f"stopped, but its record was not updated ({e})"
    d = {"run": run_id, "state": DOWN, "action": what, "run_url": record.spec.run_url or "its bucket"}
    notes = [n for n in (record.recovered, unrecorded) if n]
    if notes:
        d["note"] = "; ".join(notes)
    return d
