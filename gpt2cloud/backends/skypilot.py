"""The two SkyPilot backends: an on-demand cluster (autostop with down) and a managed job on spot.

Both go through backends/sky_sdk.py, the one module that calls SkyPilot's SDK, and map SkyPilot's
exceptions to one-line UserErrors (backends/sky_errors.py).

Money safety: a launch is a request on SkyPilot's API server, and Ctrl-C on this side does not stop
it; the server goes on provisioning. So the request id is recorded the moment SkyPilot hands it out
(`save`), and a launch that fails or is interrupted cancels its request and removes whatever it
provisioned before the error goes on. When that removal fails, a loud one-line warning names the
command that removes it. (SIGTERM and SIGHUP take the same road: gpt2cloud/launch/start.py turns them
into a KeyboardInterrupt for the length of the launch.)

A run may be launched again (it resumes), so its handle keeps every launch request and job id of every
attempt: `status`, the relaunch check and `down` ask SkyPilot about each, and so an attempt whose launch
was killed (-9, a lost machine) is still seen, and cancelled, while it provisions.
"""

from __future__ import annotations

import copy
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from gpt2cloud.backends import ACTIVE_STATES, register, sky_sdk
from gpt2cloud.backends.sky_errors import ClusterGone, ControllerNotUp, first_line, sky_errors
from gpt2cloud.errors import UserError
from gpt2cloud.names import ANY, CLUSTER, DOWN, LAUNCH_FAILED, LAUNCHING, MANAGED_JOB, UNKNOWN

# A launch request still under way (sky_sdk.request_statuses): SkyPilot may still be provisioning for it,
# whatever the record says (the launch that made it may have been killed).
ACTIVE_REQUEST = {"PENDING", "WAITING", "RUNNING"}

Save = Optional[Callable[[object], None]]

# A managed job not started yet: SkyPilot's controller is still asking the clouds for a node
NOT_STARTED = {"PENDING", "SUBMITTED", "STARTING"}
POLL_S = 10.0  # how often a spot launch with --retry-until-up asks whether its managed job has started
CANCEL_RETRY_S = 30.0  # RetryWindow: a cancel the server did not take is sent again this often


@dataclass
class SkyHandle:
    """Where a SkyPilot run lives (the run record's "handle"). A record rebuilt from what exists has none:
    the run is then found by its name, which is the cluster's name and the managed job's."""

    cluster: Optional[str] = None  # the SkyPilot cluster's name (kind CLUSTER)
    job_id: Optional[int] = None  # the latest attempt's job id on the cluster, or its managed job id
    request_id: Optional[str] = None  # the latest attempt's SkyPilot launch request
    # Every attempt's, oldest first (a record written before these lists has its one request_id and
    # job_id only: every_request() and every_job() count those in)
    request_ids: list = field(default_factory=list)
    job_ids: list = field(default_factory=list)

    def every_request(self) -> list[str]:
        return _union(self.request_ids, [self.request_id])

    def every_job(self) -> list[int]:
        return _union(self.job_ids, [self.job_id])

    def next_attempt(self, cluster: Optional[str]) -> "SkyHandle":
        """The handle of a new launch of the run: the earlier attempts' ids kept, none of its own yet."""
        return SkyHandle(cluster=cluster, request_ids=self.every_request(), job_ids=self.every_job())

    def got_request(self, request_id: str) -> None:
        self.request_id = request_id
        self.request_ids = _union(self.request_ids, [request_id])

    def got_jobs(self, *job_ids) -> None:
        self.job_ids = _union(self.job_ids, list(job_ids))


def _union(known: list, more: list) -> list:
    """known, then what of more is not in it yet, in order; None left out."""
    out: list = []
    for x in [*known, *more]:
        if x is not None and x not in out:
            out.append(x)
    return out


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
        record.handle.got_request(request_id)
        if save is not None:
            save(record)
    return on_request


def _say(line: str) -> None:
    """One line to stderr. After SIGHUP the terminal may be gone (EIO): the cleanup this line reports on
    is done, and the error that started it must go on, not an OSError in its place."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _warn(thing: str, error: BaseException, commands: str) -> str:
    """Print the loud warning of something that may still bill; return the same as a clause."""
    reason = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {first_line(error)}"
    _say(f"WARNING: {thing} MAY STILL BE RUNNING AND BILLING ({reason}); remove it now: {commands}")
    return f"could not remove {thing}: run {commands}"


def _cancel_request(record, done: list) -> None:
    """The first step of cleaning up after a launch: cancel its request. When that fails (the server died
    mid-launch, say), the teardown still runs: SkyPilot's down waits for the launch's hold on the
    cluster, and the SDK restarts a local server that went away."""
    request_id = _handle(record).request_id
    if not request_id:
        return  # interrupted before SkyPilot handed one out
    try:
        with sky_errors(f"clean up {record.run_id}"):
            if sky_sdk.cancel_requests([request_id]):
                done.append("cancelled SkyPilot's launch request")
    except UserError:
        pass


def _under_way(record) -> list[str]:
    """The run's launch requests (every attempt's) that SkyPilot still works on; call inside sky_errors."""
    ids = _handle(record).every_request()
    if not ids:
        return []
    statuses = sky_sdk.request_statuses(ids)
    return [i for i in ids if statuses.get(i) in ACTIVE_REQUEST]


def _cancel_launches(record) -> str:
    """`down`, first: cancel every launch request of the run still under way (SkyPilot waits until each
    is), so nothing is provisioned after the teardown that follows. What it did, as a clause."""
    ids = _handle(record).every_request()
    if not ids:
        return ""
    with sky_errors(f"down {record.run_id}: cancel its launch"):
        cancelled = sky_sdk.cancel_requests(ids)
    return f"cancelled its launch request{_s(cancelled)} {', '.join(cancelled)}" if cancelled else ""


def _s(items) -> str:
    return "s" if len(items) > 1 else ""


def _then(first: str, then: str) -> str:
    return f"{first}, then {then}" if first else then


class RetryWindow:
    """--retry-until-up's bound on a cluster launch. SkyPilot retries the provisioning round after round
    until capacity turns up, with no end of its own, and the launch streams its output all the while; so a
    thread cancels the launch request once `minutes` have passed (as `gpt2cloud down` would: the server
    kills the request's worker), which ends the stream with RequestCancelled. The launch then fails as an
    interrupted one does: its cleanup removes what was provisioned, and raise_if_passed() says why."""

    def __init__(self, minutes: float):
        self.minutes = minutes
        self.done = threading.Event()  # the launch ended: nothing to cancel
        self.passed = threading.Event()  # the window passed and the request was cancelled

    def watch(self, on_request: Callable[[str], None]) -> Callable[[str], None]:
        """on_request, and then the window opens for the request SkyPilot handed out."""
        def watching(request_id: str) -> None:
            on_request(request_id)
            if self.minutes > 0:
                threading.Thread(target=self._cancel_when_passed, args=(request_id,), daemon=True,
                                 name="gpt2cloud-retry-window").start()
        return watching

    def _cancel_when_passed(self, request_id: str) -> None:
        if self.done.wait(self.minutes * 60):
            return
        while not self.done.is_set():  # a cancel the server did not take (busy, restarting) goes again
            try:
                if sky_sdk.cancel_requests([request_id]):
                    self.passed.set()
                return  # cancelled, or it had ended on its own: the stream ends either way
            except Exception:  # noqa: BLE001 - any failure of the cancel: try again while the launch lasts
                self.done.wait(CANCEL_RETRY_S)

    def close(self) -> None:
        self.done.set()

    def raise_if_passed(self, record) -> None:
        spec = record.spec
        if self.passed.is_set():
            raise UserError(f"launch {spec.run_id}: no {spec.gpu_type}:{spec.gpus_per_node} came up on "
                            f"{_where(record) or 'any enabled cloud'} in the {self.minutes:g} min of --retry-minutes "
                            "(SkyPilot retried until then), so its launch request was cancelled; try another --infra "
                            "or GPU type, or a longer --retry-minutes") from None


def _wait_until_started(record, job_id: Optional[int], minutes: float) -> None:
    """--retry-until-up on spot: SkyPilot's controller retries a managed job's first launch until capacity
    turns up, with no end (sky/jobs/recovery_strategy.py: launch() calls _launch(max_retry=None)); wait at
    most `minutes` for the job to leave PENDING/STARTING, else raise (the launch's cleanup cancels it)."""
    spec = record.spec
    deadline = time.monotonic() + minutes * 60
    _say(f"waiting up to {minutes:g} min for managed job {job_id} to start (SkyPilot retries until capacity "
         "turns up)")
    while True:
        with sky_errors(f"launch {spec.run_id}", infra=spec.infra):
            state = sky_sdk.managed_jobs(spec.run_id).get(job_id) if job_id is not None else None
        if state is not None and state not in NOT_STARTED:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise UserError(f"launch {spec.run_id}: managed job {job_id} did not start in the {minutes:g} min of "
                            f"--retry-minutes (no {spec.gpu_type}:{spec.gpus_per_node} came up on "
                            f"{_where(record) or 'any enabled cloud'}; it was {state or 'not listed yet'}); try "
                            "another --infra or GPU type, or a longer --retry-minutes")
        time.sleep(min(POLL_S, left))


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
        _say(f"launch of {record.run_id} stopped: " + ("; ".join(done) or "nothing was left running"))
        raise


@register
class ClusterBackend:
    """An on-demand cluster named after the run; autostop with down, so nothing bills after the run."""

    kind = CLUSTER
    handle_type = SkyHandle

    def start(self, record, task_cfg: dict, secrets: dict, save: Save = None) -> None:
        spec = record.spec
        task = to_sky_task(task_cfg, secrets)
        record.handle = handle = _handle(record).next_attempt(cluster=spec.run_id)
        window = RetryWindow(spec.retry_minutes)

        def launch():
            try:
                with sky_errors(f"launch {spec.run_id}", infra=_where(record),
                                gpus=f"{spec.gpu_type}:{spec.gpus_per_node}"):
                    handle.job_id = sky_sdk.launch_cluster(task, handle.cluster, spec.idle_minutes,
                                                           retry_until_up=window.minutes > 0,
                                                           on_request=window.watch(_recorder(record, save)))
                    handle.got_jobs(handle.job_id)
            except UserError:  # the window's cancel ends the stream as RequestCancelled: say why
                window.raise_if_passed(record)
                raise
            finally:
                window.close()

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
        """SkyPilot's state of the run's cluster and job; LAUNCHING while any launch request of the run is
        still under way and no job of it runs (the request has not made the cluster, or not submitted the
        job to a live one, yet), whether or not the launch that made the request is still alive."""
        name = self._name(record)
        with sky_errors(f"status {record.run_id}"):
            cluster = sky_sdk.cluster_status(name)
            if cluster is None:
                if _under_way(record):
                    return LAUNCHING
                return record.state if record.state in (DOWN, LAUNCH_FAILED) else "TERMINATED"
            if cluster != "UP":
                return f"CLUSTER_{cluster}"
            job = sky_sdk.cluster_job_status(name, _handle(record).job_id)
            if job not in ACTIVE_STATES and _under_way(record):
                return LAUNCHING
        return job or "UP"

    def logs(self, record, follow: bool) -> int:
        with sky_errors(f"logs {record.run_id}", infra=record.spec.infra):
            return sky_sdk.tail_logs(self._name(record), _handle(record).job_id, follow)

    def stop(self, record) -> str:
        """Cancel every launch request of the run still under way, then tear the cluster down."""
        cancelled = _cancel_launches(record)
        try:
            with sky_errors(f"down {record.run_id}", infra=record.spec.infra):
                sky_sdk.down(self._name(record))
        except ClusterGone:
            if cancelled:
                return f"{cancelled}; no cluster was left"
            return "its cluster was already gone"
        return _then(cancelled, f"tore down cluster {self._name(record)}")


def _latest_job(record, jobs: dict) -> Optional[int]:
    """The latest attempt's managed job id: the one it learnt; else (the launch died before it learnt it,
    or the record was rebuilt from what exists) the newest job of the run's name no earlier attempt had."""
    handle = _handle(record)
    if handle.job_id is not None:
        return handle.job_id
    return max((j for j in jobs if j not in handle.every_job()), default=None)


@register
class ManagedJobBackend:
    """A managed job (spot): SkyPilot's controller relaunches a preempted node, which resumes from the bucket.
    Every managed job of a run bears the run's name; SkyPilot is asked about them by that name."""

    kind = MANAGED_JOB
    handle_type = SkyHandle

    def start(self, record, task_cfg: dict, secrets: dict, save: Save = None) -> None:
        spec = record.spec
        task = to_sky_task(task_cfg, secrets)
        record.handle = handle = _handle(record).next_attempt(cluster=None)
        minutes = spec.retry_minutes

        def launch():
            with sky_errors(f"launch {spec.run_id}", infra=_where(record),
                            gpus=f"{spec.gpu_type}:{spec.gpus_per_node}"):
                handle.job_id = sky_sdk.launch_managed_job(task, spec.run_id, on_request=_recorder(record, save))
                handle.got_jobs(handle.job_id)
            if minutes > 0:  # inside the guard: past the window (or Ctrl-C) the cleanup cancels the job
                _wait_until_started(record, handle.job_id, minutes)

        _launch_guarded(record, launch, self._cancel_left_job)

    def _cancel_jobs(self, record) -> list[int]:
        """Cancel every managed job of the run still in progress: any attempt's, one submitted by an attempt
        killed before it learnt the id included. Raises ControllerNotUp (then none is in progress)."""
        with sky_errors(f"cancel {record.run_id}", infra=record.spec.infra):
            jobs = sky_sdk.managed_jobs(record.run_id)
            live = sorted(j for j, state in jobs.items() if state in ACTIVE_STATES)
            if live:
                sky_sdk.cancel_managed_jobs(live)
        if isinstance(record.handle, SkyHandle):
            record.handle.got_jobs(*live)  # a job found by name: the record now knows it too
        return live

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
        """A managed job of the run still in progress (any attempt's) first; else LAUNCHING while a launch
        request of the run is under way (it may spend minutes starting the jobs controller); else the
        latest attempt's job."""
        with sky_errors(f"status {record.run_id}"):
            launching = bool(_under_way(record))
        try:
            with sky_errors(f"status {record.run_id}"):
                jobs = sky_sdk.managed_jobs(record.run_id)
        except ControllerNotUp:  # no managed job is in progress
            if launching:
                return LAUNCHING  # its request is still starting SkyPilot's jobs controller
            if record.state in (DOWN, LAUNCH_FAILED):
                return record.state
            raise
        live = [j for j in sorted(jobs) if jobs[j] in ACTIVE_STATES]
        if live:
            return jobs[live[-1]]
        if launching:
            return LAUNCHING
        if _handle(record).job_id is None and record.state in (DOWN, LAUNCH_FAILED):
            return record.state
        return jobs.get(_latest_job(record, jobs)) or UNKNOWN

    def job_records(self, record) -> dict[int, dict]:
        """SkyPilot's records of every managed job of the run (sky_sdk.managed_job_records: status, recoveries,
        run time, submission): what gpt2cloud/runs/attempts.py counts the run's attempts from. Raises
        ControllerNotUp when SkyPilot's jobs controller is not up (then it cannot say), else a UserError."""
        with sky_errors(f"status {record.run_id}", infra=record.spec.infra):
            return sky_sdk.managed_job_records(record.run_id)

    def _job_id(self, record) -> int:
        """The latest attempt's managed job; UserError when SkyPilot has none."""
        with sky_errors(f"logs {record.run_id}", infra=record.spec.infra):
            jobs = sky_sdk.managed_jobs(record.run_id)
        job_id = _latest_job(record, jobs)
        if job_id is None:
            raise UserError(f"run '{record.run_id}' has no managed job (its launch did not finish); see "
                            "`sky jobs queue`")
        if job_id not in jobs:
            raise UserError(f"logs {record.run_id}: SkyPilot has no managed job {job_id} any more")
        return job_id

    def logs(self, record, follow: bool) -> int:
        # SkyPilot's log call swallows a missing controller or job unless it follows: ask first
        job_id = self._job_id(record)
        with sky_errors(f"logs {record.run_id}", infra=record.spec.infra):
            return sky_sdk.tail_managed_logs(job_id, follow)

    def stop(self, record) -> str:
        """Cancel every launch request of the run still under way (so none submits a job after this), then
        every managed job of the run in progress."""
        cancelled = _cancel_launches(record)
        try:
            ids = self._cancel_jobs(record)
        except ControllerNotUp:
            return _then(cancelled, "no managed job was running (SkyPilot's jobs controller is not up)")
        if not ids:
            return _then(cancelled, f"no managed job named {record.run_id} was in progress")
        theirs = "their clusters" if len(ids) > 1 else "its cluster"
        return _then(cancelled, f"cancelled managed job{_s(ids)} {', '.join(map(str, ids))} (SkyPilot tears "
                                f"{theirs} down)")


# ---- SkyPilot's managed-jobs controller ----

def remove_jobs_controller() -> str:
    """`gpt2cloud down --controller`: tear down SkyPilot's managed-jobs controller, the VM a spot run leaves
    behind (SkyPilot stops it after 10 idle minutes and keeps it: sky/jobs/constants.py CONTROLLER_AUTOSTOP
    has down: False, so its 50 GB disk bills on). Refused while any managed job of any user is live, as
    SkyPilot's own `sky down` of it is: the controller is what recovers and cancels them. As in SkyPilot's
    CLI, the check and the teardown are not one step: a spot launch started in between loses its controller."""
    what = "down --controller"
    with sky_errors(what):
        found = sky_sdk.jobs_controller()
    if found is None:
        return "SkyPilot's jobs controller is not there: nothing to remove"
    name, status = found
    if status == "INIT":  # a spot launch may be starting it right now
        raise UserError(f"{what}: SkyPilot's jobs controller {name} is being started or repaired (INIT), maybe "
                        f"by a spot launch under way; retry once `sky status {name}` says UP or STOPPED")
    try:
        with sky_errors(what):
            live = sky_sdk.live_managed_jobs()
    except ControllerNotUp:  # stopped: no managed job is in progress (SkyPilot's CLI reasons the same)
        live = {}
    if live:
        jobs = ", ".join(f"{j} ({n or '?'}, {state})" for j, (n, state) in sorted(live.items()))
        raise UserError(f"{what}: SkyPilot's jobs controller {name} still manages {len(live)} live managed "
                        f"job{_s(live)}: {jobs}; it stays while they run: stop them first (`gpt2cloud down RUN` "
                        "or `sky jobs cancel ID`; a cancelled job ends within a minute or two), then retry")
    try:
        with sky_errors(what):
            sky_sdk.down(name)
    except ClusterGone:
        return f"SkyPilot's jobs controller {name} was already gone"
    return f"tore down SkyPilot's jobs controller {name} (it was {status}); the next spot launch starts a new one"
