"""Where a run runs: one Backend interface, one implementation per kind of run.

    local        LocalBackend: the node's scripts on this machine (backends/local.py)
    cluster      ClusterBackend: an on-demand SkyPilot cluster with autostop-down (backends/skypilot.py)
    managed-job  ManagedJobBackend: a SkyPilot managed job on spot, recovered after preemption

Commands and the launch never switch on the kind: they ask `backend_for(kind)`. A fourth backend is a
new module with these four methods and one line in BACKENDS. Only backends/sky_sdk.py calls SkyPilot's SDK.
"""

from __future__ import annotations

from typing import Protocol

# What state_of says while a run is (still) under way: SkyPilot's job and managed-job states, and the
# local node's RUNNING. A cluster that is up but has no live job (CLUSTER_*, UP) is not, nor is an
# UNKNOWN state: the launch goes on, and SkyPilot reuses a live cluster.
ACTIVE_STATES = {"INIT", "PENDING", "SUBMITTED", "STARTING", "SETTING_UP", "RUNNING", "RECOVERING"}


class Backend(Protocol):
    """`record` is a gpt2cloud.runs.registry.RunRecord; a backend reads its spec and sets where the run lives."""

    kind: str

    def start(self, record, task_cfg: dict, secrets: dict, save=None) -> None:
        """Start the task (gpt2cloud/launch/task.py's config) and note in record where it runs.

        `save(record)` writes the record to the registry: a backend calls it as soon as it learns
        something `down` needs before start returns (SkyPilot's launch request id), so a launch
        interrupted in any way can still be cancelled. A launch that fails or is interrupted removes
        what it provisioned before the error goes on (or warns loudly that it could not)."""

    def state(self, record) -> str:
        """The run's state now (RUNNING, SUCCEEDED, FAILED ..., TERMINATED); may raise UserError."""

    def logs(self, record, follow: bool) -> int:
        """Print the run's console output (following it until it ends); the exit code to pass on.
        UserError when the backend has none (the cluster is gone): the bucket's copy remains."""

    def stop(self, record) -> str:
        """Stop the run and everything that bills for it (a launch still under way included); say what
        was done."""


def backend_for(kind: str) -> Backend:
    from gpt2cloud.backends.local import LocalBackend
    from gpt2cloud.backends.skypilot import ClusterBackend, ManagedJobBackend

    backends = {b.kind: b for b in (LocalBackend(), ClusterBackend(), ManagedJobBackend())}
    if kind not in backends:
        raise ValueError(f"unknown kind of run {kind!r}; known: {', '.join(backends)}")
    return backends[kind]


def state_of(record) -> str:
    """The run's state as its backend sees it now; never raises (status must still show the bucket's progress)."""
    from gpt2cloud.errors import UserError

    try:
        return backend_for(record.spec.kind).state(record)
    except UserError as e:
        return f"UNKNOWN ({e})"
    except Exception as e:  # noqa: BLE001 - e.g. SkyPilot's API server cannot start
        return f"UNKNOWN ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
