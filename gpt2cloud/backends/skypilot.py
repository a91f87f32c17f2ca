"""The two SkyPilot backends: an on-demand cluster (autostop with down) and a managed job on spot.

Both go through backends/sky_sdk.py, the one module that calls SkyPilot's SDK, and map SkyPilot's
exceptions to one-line UserErrors (backends/sky_errors.py).

Money safety: a launch is a request on SkyPilot's API server, and Ctrl-C on this side does not stop
it; the server goes on provisioning. So the request id is recorded the moment SkyPilot hands it out
(`save`), and a launch that fails or is interrupted cancels its request and removes whatever it
provisioned before the error goes on. When that removal fails, a loud one-line warning names the
command that removes it. `down` of a run still launching cancels the request before tearing down.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from gpt2cloud.backends import register, sky_sdk
from gpt2cloud.backends.sky_errors import ClusterGone, ControllerNotUp, first_line, sky_errors
from gpt2cloud.errors import UserError
from gpt2cloud.names import ANY, CLUSTER, DOWN, LAUNCH_FAILED, LAUNCHING, MANAGED_JOB, UNKNOWN

# A launch request still under way (sky_sdk.request_status): while the record says LAUNCHING, a `down`
# may race SkyPilot still provisioning.
ACTIVE_REQUEST = {"PENDING", "WAITING", "RUNNING"}

Save = Optional[Callable[[object], None]]


@dataclass
class SkyHandle:
    """Where a SkyPilot run lives (the run record's "handle"). A record rebuilt from what exists has none:
    the run is then found by its name, which is the cluster's name and the managed job's."""

    cluster: Optional[str] = None  # the SkyPilot cluster's name (kind CLUSTER)
    job_id: Optional[int] = None  # the job id on the cluster, or the managed job id
    request_id: Optional[str] = None  # the SkyPilot launch request: `down` cancels it while LAUNCHING


def _handle(record) -> SkyHandle:
    """The record's handle; an empty one (not stored) if it has none yet."""
    return record.handle if isinstance(record.handle, SkyHandle) else SkyHandle()


def to_sky_task(task_cfg: dict, secrets: Optional[dict] = None):
    """A real sky.Task from the task config (whose secrets are null), with the secret values filled in
    as `sky launch --secret` does."""
    import sky

    overrides = [(k, v) for k, v in (secrets or {}).items() if v is not None]
    try:
        # a copy: SkyPilot's parser pops keys from the dict it is given
        return sky.Task.from_yaml_config(copy.deepcopy(task_cfg), secrets_overrides=overrides or None)
    except (sky.exceptions.InvalidSkyPilotConfigError, ValueError) as e:
        raise UserError(f"SkyPilot rejected the generated task: {str(e).splitlines()[0]}") from None


def _where(record) -> Optional[str]:
    return None if record.spec.infra == ANY else record.spec.infra


def _recorder(record, save: Save):
    """sky_sdk's on_request: note the launch's request id in the record's handle and save it at once, so
    that `gpt2cloud down` (or the cleanup below) can cancel the request whatever happens to this process."""
    def on_request(request_id: str) -> None:
        record.handle.request_id = request_id
        if save is not None:
            save(record)
    return on_request


def _warn(thing: str, error: BaseException, commands: str) -> str:
    """Print the loud warning of something that may still bill; return the same as a clause."""
    reason = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {first_line(error)}"
    print(f"WARNING: {thing} MAY STILL BE RUNNING AND BILLING ({reason}); remove it now: {commands}",
          file=sys.stderr)
    return f"could not remove {thing}: run {commands}"


def _cancel_request(record, done: list) -> None:
    """The first step of cleaning up after a launch. When it fails (the server died mid-launch, say),
    the teardown still runs: SkyPilot's down waits for the launch's hold on the cluster, and the SDK
    restarts a local server that went away."""
    request_id = _handle(record).request_id
    if not request_id:
        return  # interrupted before SkyPilot handed one out
    try:
        with sky_errors(f"clean up {record.run_id}"):
            if sky_sdk.cancel_request(request_id):
                done.append("cancelled SkyPilot's launch request")
    except UserError:
        pass


def _launch_guarded(record, launch: Callable[[], None], clean_up: Callable[[object, list], None]) -> None:
    """Run the launch; when it fails or is interrupted, clean up first (clean_up appends what it did),
    then let the error go on: a UserError says what the cleanup did, Ctrl-C (or a crash) prints it."""
    try:
        launch()
    except UserError as e:
        done: list = []
        clean_up(record, done)
        if done:
            raise type(e)(f"{e}; " + "; ".join(done)) from None
        raise
    except BaseException:
        done = []
        clean_up(record, done)
        print(f"launch of {record.run_id} stopped: " + ("; ".join(done) or "nothing was left running"),
              file=sys.stderr)
        raise


def _cancel_launch(record) -> str:
    """`down` of a run whose launch may still be under way: cancel SkyPilot's request and wait for it,
    so nothing is provisioned after the teardown that follows."""
    request_id = _handle(record).request_id
    if record.state != LAUNCHING or not request_id:
        return ""
    with sky_errors(f"down {record.run_id}: cancel its launch"):
        cancelled = sky_sdk.cancel_request(request_id)
    return "cancelled its launch request, then " if cancelled else ""


@register
class ClusterBackend:
    """An on-demand cluster named after the run; autostop with down, so nothing bills after the run."""

    kind = CLUSTER
    handle_type = SkyHandle

    def start(self, record, task_cfg: dict, secrets: dict, save: Save = None) -> None:
        spec = record.spec
        task = to_sky_task(task_cfg, secrets)
        record.handle = handle = SkyHandle(cluster=spec.run_id)

        def launch():
            with sky_errors(f"launch {spec.run_id}", infra=_where(record),
                            gpus=f"{spec.gpu_type}:{spec.gpus_per_node}"):
                handle.job_id = sky_sdk.launch_cluster(task, handle.cluster, spec.idle_minutes,
                                                       on_request=_recorder(record, save))

        _launch_guarded(record, launch, self._remove_left_cluster)

    def _remove_left_cluster(self, record, done: list) -> None:
        """After a failed or interrupted launch: cancel the request, then tear down the cluster if one
        was (even partly) provisioned."""
        name = self._name(record)
        try:
            _cancel_request(record, done)
            with sky_errors(f"clean up {record.run_id}"):
                # SkyPilot's own record, not the cloud's: a cluster being provisioned is there (INIT)
                if sky_sdk.cluster_status(name, refresh=False) is None:
                    return
                sky_sdk.down(name)
            done.append(f"removed cluster {name}, so nothing bills")
        except ClusterGone:
            return
        except BaseException as e:  # noqa: BLE001 - a second Ctrl-C too: warn, the first error goes on
            done.append(_warn(f"cluster {name}", e, f"`gpt2cloud down {record.run_id}` or `sky down {name}`"))

    def _name(self, record) -> str:
        return _handle(record).cluster or record.run_id

    def state(self, record) -> str:
        handle = _handle(record)
        with sky_errors(f"status {record.run_id}"):
            cluster = sky_sdk.cluster_status(self._name(record))
            if cluster is None:
                if record.state == LAUNCHING and handle.request_id and \
                        sky_sdk.request_status(handle.request_id) in ACTIVE_REQUEST:
                    return LAUNCHING  # the request has not made the cluster yet
                return record.state if record.state in (DOWN, LAUNCH_FAILED) else "TERMINATED"
            if cluster != "UP":
                return f"CLUSTER_{cluster}"
            return sky_sdk.cluster_job_status(self._name(record), handle.job_id) or "UP"

    def logs(self, record, follow: bool) -> int:
        with sky_errors(f"logs {record.run_id}", infra=record.spec.infra):
            return sky_sdk.tail_logs(self._name(record), _handle(record).job_id, follow)

    def stop(self, record) -> str:
        cancelled = _cancel_launch(record)
        try:
            with sky_errors(f"down {record.run_id}", infra=record.spec.infra):
                sky_sdk.down(self._name(record))
        except ClusterGone:
            if cancelled:
                return "cancelled its launch request; no cluster was left"
            return "its cluster was already gone"
        return cancelled + f"tore down cluster {self._name(record)}"


@register
class ManagedJobBackend:
    """A managed job (spot): SkyPilot's controller relaunches a preempted node, which resumes from the bucket."""

    kind = MANAGED_JOB
    handle_type = SkyHandle

    def start(self, record, task_cfg: dict, secrets: dict, save: Save = None) -> None:
        spec = record.spec
        task = to_sky_task(task_cfg, secrets)
        record.handle = handle = SkyHandle()

        def launch():
            with sky_errors(f"launch {spec.run_id}", infra=_where(record),
                            gpus=f"{spec.gpu_type}:{spec.gpus_per_node}"):
                handle.job_id = sky_sdk.launch_managed_job(task, spec.run_id, on_request=_recorder(record, save))

        _launch_guarded(record, launch, self._cancel_left_job)

    def _cancel_jobs(self, record) -> list[int]:
        """Cancel the run's managed job: by id, or by name when the launch never learnt the id.
        Raises ControllerNotUp (no managed job in progress)."""
        with sky_errors(f"cancel {record.run_id}", infra=record.spec.infra):
            job_id = _handle(record).job_id
            ids = [job_id] if job_id is not None else sky_sdk.managed_job_ids(record.run_id)
            for job_id in ids:
                sky_sdk.cancel_managed_job(job_id)
        return ids

    def _cancel_left_job(self, record, done: list) -> None:
        """After a failed or interrupted launch: cancel the request and any job it submitted."""
        try:
            _cancel_request(record, done)
            ids = self._cancel_jobs(record)
            if ids:
                done.append(f"cancelled managed job {', '.join(map(str, ids))}")
        except ControllerNotUp:
            return
        except BaseException as e:  # noqa: BLE001 - a second Ctrl-C too: warn, the first error goes on
            done.append(_warn(f"managed job {record.run_id}", e,
                              f"`gpt2cloud down {record.run_id}` or `sky jobs cancel -n {record.run_id}`"))

    def state(self, record) -> str:
        handle = _handle(record)
        if handle.job_id is None:
            # No job id yet: the launch request (which may still be starting the jobs controller, minutes)
            # says whether one is coming; a LAUNCHING record whose request is over was left by a killed launch.
            if record.state != LAUNCHING:
                return record.state
            if handle.request_id:
                with sky_errors(f"status {record.run_id}"):
                    if sky_sdk.request_status(handle.request_id) in ACTIVE_REQUEST:
                        return LAUNCHING
            return UNKNOWN
        with sky_errors(f"status {record.run_id}"):
            return sky_sdk.managed_job_status(handle.job_id) or UNKNOWN

    def logs(self, record, follow: bool) -> int:
        job_id = _handle(record).job_id
        if job_id is None:
            raise UserError(f"run '{record.run_id}' has no managed job id (its launch did not finish); see "
                            "`sky jobs queue`")
        with sky_errors(f"logs {record.run_id}", infra=record.spec.infra):
            # SkyPilot's log call swallows a missing controller or job unless it follows: ask first
            if sky_sdk.managed_job_status(job_id) is None:
                raise UserError(f"logs {record.run_id}: SkyPilot has no managed job {job_id} any more")
            return sky_sdk.tail_managed_logs(job_id, follow)

    def stop(self, record) -> str:
        cancelled = _cancel_launch(record)
        try:
            ids = self._cancel_jobs(record)
        except ControllerNotUp:
            return cancelled + "no managed job was running (SkyPilot's jobs controller is not up)"
        if not ids:
            return cancelled + f"no managed job named {record.run_id} was in progress"
        return cancelled + f"cancelled managed job {', '.join(map(str, ids))} (SkyPilot tears its cluster down)"
