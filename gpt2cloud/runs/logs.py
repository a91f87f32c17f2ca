"""`gpt2cloud logs` and `down`: a run's console output, and stopping everything that bills for it."""

from __future__ import annotations

import sys

from gpt2cloud.backends import backend_for
from gpt2cloud.errors import UserError
from gpt2cloud.runs import registry
from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import LOGS


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
    """Stop the run's cluster, managed job or local process tree; the bucket keeps its checkpoints."""
    record = registry.get(run_id)
    what = backend_for(record.spec.kind).stop(record)
    registry.note(record, f"down: {what}", state="DOWN")
    return {"run": run_id, "state": "DOWN", "action": what, "run_url": record.spec.run_url}
