"""Where a run runs: one Backend interface, one implementation per kind of run.

    local        LocalBackend: the node's scripts on this machine (backends/local.py)
    cluster      ClusterBackend: an on-demand SkyPilot cluster with autostop-down (backends/skypilot.py)
    managed-job  ManagedJobBackend: a SkyPilot managed job on spot, recovered after preemption

Commands and the launch never switch on the kind: they ask `backend_for(kind)`. A backend is a class
decorated with `@register` in a module listed in MODULES; it keeps what it needs to find its run again
(a cluster name, a job id, a PID ...) in its own handle, a dataclass in its module that the run's record
stores as a dict under "handle". A fourth backend is one new module and one line in MODULES. Only
backends/sky_sdk.py calls SkyPilot's SDK.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Protocol

from gpt2cloud.errors import UserError
from gpt2cloud.names import LAUNCHING, UNKNOWN

# The modules that register backends, imported on the first backend_for (not before: `gpt2cloud --help`
# stays instant, and a command that never asks for a backend never imports one)
MODULES = (
    "gpt2cloud.backends.local",
    "gpt2cloud.backends.skypilot",
)

BACKENDS: dict[str, type] = {}  # kind -> backend class, filled by @register as MODULES are imported

# What state_of says while a run is (still) under way: SkyPilot's job and managed-job states that are not
# final (CANCELLING and WINDING_DOWN too: the job's cluster still bills), and the local node's RUNNING. A
# cluster that is up but has no live job (UP) is not, nor is an UNKNOWN state: the launch goes on, and
# SkyPilot reuses a live cluster. A launch still under way is MAY_BE_ALIVE's.
ACTIVE_STATES = {"INIT", "PENDING", "SUBMITTED", "STARTING", "SETTING_UP", "RUNNING", "RECOVERING", "CANCELLING",
                 "WINDING_DOWN"}
# What refuses a relaunch (gpt2cloud/launch/start.py check_name): a live job, or an earlier attempt whose
# launch request is still under way (LAUNCHING: the backends ask SkyPilot about every request of the run)
# or whose cluster is still being provisioned (CLUSTER_INIT). Two attempts at once would bill twice and
# write one bucket prefix.
LAUNCH_UNDER_WAY = {LAUNCHING, "CLUSTER_INIT"}  # CLUSTER_INIT: SkyPilot's
MAY_BE_ALIVE = ACTIVE_STATES | LAUNCH_UNDER_WAY



class NothingRunning(UserError):
    """What a backend's state() may raise when its own answer is that nothing of the run is there any more
    (SkyPilot: the cluster is gone, or the managed-jobs controller is down, so no managed job is in
    progress): a message for `status`, and for the relaunch check a confirmation that no attempt is alive."""


class Backend(Protocol):
    """`record` is a gpt2cloud.runs.registry.RunRecord; a backend reads its spec and keeps where the run
    lives in `record.handle`, an instance of its own `handle_type` (None until start() sets it, and in a
    record rebuilt from what exists: then the backend finds the run by its name)."""

    kind: str
    handle_type: type  # a dataclass whose fields are JSON values, every one with a default

    def start(self, record, task_cfg: dict, secrets: dict, save=None) -> None:
        """Start the task (gpt2cloud/launch/task.py's config) and set record.handle to where it runs.

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


def register(cls: type) -> type:
    """Class decorator: make cls the backend of runs of kind `cls.kind`."""
    if cls.kind in BACKENDS and BACKENDS[cls.kind] is not cls:
        raise ValueError(f"two backends for kind of run {cls.kind!r}: {BACKENDS[cls.kind].__name__}, {cls.__name__}")
    BACKENDS[cls.kind] = cls
    return cls


def backend_class(kind: str) -> type:
    for module in MODULES:
        importlib.import_module(module)  # registers its backends (once: Python caches modules)
    if kind not in BACKENDS:
        raise ValueError(f"unknown kind of run {kind!r}; known: {', '.join(BACKENDS)}")
    return BACKENDS[kind]


def backend_for(kind: str) -> Backend:
    return backend_class(kind)()


def handle_from_dict(kind: str, d: dict):
    """The handle of a run of this kind from its record's JSON (keys its handle does not have are dropped:
    a record written by another version). ValueError for an unknown kind, TypeError for a non-dict."""
    cls = backend_class(kind).handle_type
    if not isinstance(d, dict):
        raise TypeError(f"a run's handle is a JSON object, not {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


def state_of(record) -> str:
    """The run's state as its backend sees it now; never raises (status must still show the bucket's progress)."""
    try:
        return backend_for(record.spec.kind).state(record)
    except UserError as e:
        return f"{UNKNOWN} ({e})"
    except Exception as e:  # noqa: BLE001 - e.g. SkyPilot's API server cannot start
        return f"{UNKNOWN} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
