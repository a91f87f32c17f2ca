"""The one place that talks to SkyPilot's API server: launch, cancel, status, logs, down (the jobs
controller's too).

Everything here goes through the SkyPilot SDK (0.14: every call returns a request id; `sky.get` /
`sky.stream_and_get` wait for the result and re-raise SkyPilot's own exception classes). What to do
when a call fails (cancel, tear down, warn) is the backends' business (backends/skypilot.py); this
module only makes the calls. Tests replace these functions with a fake bound to their signatures
(tests/test_launch_sdk.py) and also run them against SkyPilot's real local API server
(tests/test_sky_server.py). `import sky` happens inside each function: it costs seconds.
"""

from __future__ import annotations

from typing import Callable, Optional

# Called with a launch's request id as soon as SkyPilot hands it out, before anything is streamed:
# the caller records it, so an interrupted launch (or `gpt2cloud down` from another terminal) can
# cancel the request; Ctrl-C on the client alone leaves the server provisioning.
OnRequest = Optional[Callable[[str], None]]


def _field(record, name):
    if isinstance(record, dict):
        return record.get(name)
    return getattr(record, name, None)


def _name(status) -> Optional[str]:
    if status is None:
        return None
    return getattr(status, "value", None) or str(status)


def _submitted(request_id, on_request: OnRequest) -> None:
    if on_request is not None:
        on_request(str(request_id))


def launch_cluster(task, cluster_name: str, idle_minutes: int, *, retry_until_up: bool = False,
                   dryrun: bool = False, on_request: OnRequest = None) -> Optional[int]:
    """Provision (or reuse) a cluster, run the task on it; autostop with down: nothing bills after.

    retry_until_up: SkyPilot retries the provisioning, round after round, until capacity turns up, with
    no end of its own (the caller bounds it by cancelling the request). Returns the job id on the cluster
    (None for a dry run, which only runs SkyPilot's optimizer). Streams SkyPilot's provisioning output.
    """
    import sky

    request = sky.launch(task, cluster_name=cluster_name, idle_minutes_to_autostop=idle_minutes, down=True,
                         retry_until_up=retry_until_up, dryrun=dryrun)
    _submitted(request, on_request)
    job_id, _handle = sky.stream_and_get(request)
    return job_id


def launch_managed_job(task, name: str, *, on_request: OnRequest = None) -> Optional[int]:
    """A managed job (spot): SkyPilot's controller relaunches it after a preemption."""
    import sky

    request = sky.jobs.launch(task, name=name)
    _submitted(request, on_request)
    job_ids, _handle = sky.stream_and_get(request)
    if isinstance(job_ids, (list, tuple)):
        return job_ids[0] if job_ids else None
    return job_ids


def cancel_requests(request_ids: list[str]) -> list[str]:
    """Cancel those of these API-server requests still under way (a launch provisioning) and wait until
    the server has: it kills each one's worker and marks it CANCELLED. Returns the ids it cancelled; a
    request that had finished, or that the server does not know, is left as it is."""
    import sky

    ids = [str(i) for i in request_ids if i]
    if not ids:
        return []  # never ask with no ids: SkyPilot then cancels every request of this user
    return [str(i) for i in sky.get(sky.api_cancel(ids, silent=True)) or []]


def request_statuses(request_ids: list[str]) -> dict[str, Optional[str]]:
    """{request id: PENDING, WAITING, RUNNING, SUCCEEDED, FAILED or CANCELLED}, in one call; None for a
    request the server does not know (a local server that was restarted forgot the old ones: they died
    with it)."""
    import sky

    ids = [str(i) for i in request_ids if i]
    if not ids:
        return {}
    found = {str(_field(r, "request_id")): _name(_field(r, "status")) for r in sky.api_status(ids) or []}
    return {i: found.get(i) for i in ids}


def cluster_status(cluster_name: str, refresh: bool = True) -> Optional[str]:
    """UP, INIT, STOPPED, or None when the cluster does not exist (any more).

    refresh: ask the cloud about clusters with autostop or spot (StatusRefreshMode.AUTO), so one that
    autostop tore down reads as gone rather than as SkyPilot's last cached UP.
    """
    import sky

    mode = sky.StatusRefreshMode.AUTO if refresh else sky.StatusRefreshMode.NONE
    records = sky.get(sky.status(cluster_names=[cluster_name], refresh=mode))
    for r in records or []:
        if _field(r, "name") == cluster_name:
            return _name(_field(r, "status"))
    return None


def cluster_job_status(cluster_name: str, job_id: Optional[int]) -> Optional[str]:
    """RUNNING, SUCCEEDED, FAILED, ... of the job on a live cluster (None if unknown)."""
    import sky

    statuses = sky.get(sky.job_status(cluster_name, [job_id] if job_id is not None else None))
    if not statuses:
        return None
    return _name(statuses.get(job_id, next(iter(statuses.values()))))


def managed_jobs(name: str) -> dict[int, Optional[str]]:
    """{job id: PENDING, STARTING, RUNNING, RECOVERING, SUCCEEDED, FAILED, CANCELLED, ...} of every managed
    job of this user named `name` that SkyPilot's jobs controller knows, finished ones included, in one
    call. By name: a job launched by an attempt that died before it learnt the id is found too, and a
    remembered id is never taken for another job's (ids restart at 1 on a new controller).

    Raises ClusterNotUpError when the controller is not up (it never ran, or autostopped).
    """
    return {job_id: job["status"] for job_id, job in managed_job_records(name).items()}


# What a run's managed-job records are asked for (SkyPilot's server returns only the fields asked for)
JOB_FIELDS = ("job_id", "task_id", "job_name", "status", "recovery_count", "job_duration", "submitted_at",
              "last_recovered_at")


def managed_job_records(name: str) -> dict[int, dict]:
    """{job id: {"status", "recovery_count", "job_duration", "submitted_at", "last_recovered_at"}} of every
    managed job of this user named `name` (managed_jobs is this query too). recovery_count: the recoveries
    SkyPilot completed (a node replaced after a preemption or a listed exit code; 0.14.1 jobs/state.py
    set_recovered_async); job_duration: seconds it ran on nodes, 0 for a job that never started;
    last_recovered_at: when its current attempt began running.

    Raises ClusterNotUpError when the controller is not up (it never ran, or autostopped).
    """
    import sky

    # queue_v2 answers (records, total, status_counts, total_no_filter); the older jobs.queue is deprecated
    result = sky.get(sky.jobs.queue_v2(refresh=False, name_match=name, fields=list(JOB_FIELDS)))
    records = result[0] if isinstance(result, tuple) else result
    jobs: dict[int, dict] = {}
    # name_match matches substrings (and an older server ignores it): keep exact names only
    for r in records or []:
        if _field(r, "job_name") == name and _field(r, "job_id") is not None:
            jobs.setdefault(int(_field(r, "job_id")), {
                "status": _name(_field(r, "status")), "recovery_count": int(_field(r, "recovery_count") or 0),
                "job_duration": float(_field(r, "job_duration") or 0.0), "submitted_at": _field(r, "submitted_at"),
                "last_recovered_at": _field(r, "last_recovered_at")})
    return jobs


def jobs_controller() -> Optional[tuple[str, Optional[str]]]:
    """(name, UP / INIT / STOPPED) of SkyPilot's managed-jobs controller, or None when there is none. Found
    by its name's prefix, as SkyPilot's own CLI does (sky/client/cli/command.py): the rest of the name is
    the API server's id, which only the server knows."""
    import sky
    from sky.utils import common

    records = sky.get(sky.status(cluster_names=[common.JOB_CONTROLLER_PREFIX + "*"],
                                 refresh=sky.StatusRefreshMode.NONE, all_users=True))
    for r in records or []:
        name = _field(r, "name")
        if name and str(name).startswith(common.JOB_CONTROLLER_PREFIX):
            return str(name), _name(_field(r, "status"))
    return None


def live_managed_jobs() -> dict[int, tuple[Optional[str], Optional[str]]]:
    """{job id: (name, status)} of every managed job of every user that is not finished (PENDING, STARTING,
    RUNNING, RECOVERING, CANCELLING, ...): what the jobs controller still manages. Raises ClusterNotUpError
    when the controller is not up (stopped, or never launched: then none is in progress)."""
    import sky

    result = sky.get(sky.jobs.queue_v2(refresh=False, skip_finished=True, all_users=True))
    records = result[0] if isinstance(result, tuple) else result
    return {int(_field(r, "job_id")): (_field(r, "job_name"), _name(_field(r, "status")))
            for r in records or [] if _field(r, "job_id") is not None}


def down(cluster_name: str) -> None:
    """Tear a cluster down and wait for it (raises ClusterDoesNotExist when it is gone already)."""
    import sky

    sky.get(sky.down(cluster_name))


def cancel_managed_jobs(job_ids: list[int]) -> None:
    """Cancel these managed jobs; SkyPilot tears their clusters down (and skips a job that has ended).
    Raises ClusterNotUpError when the jobs controller is not up (then no managed job is in progress)."""
    import sky

    ids = sorted({int(j) for j in job_ids})
    if ids:  # never with none: a cancel that names no job is not one to send
        sky.get(sky.jobs.cancel(job_ids=ids))


def tail_logs(cluster_name: str, job_id: Optional[int], follow: bool) -> int:
    import sky

    return sky.tail_logs(cluster_name, job_id, follow)


def tail_managed_logs(job_id: int, follow: bool) -> int:
    import sky

    return sky.jobs.tail_logs(job_id=job_id, follow=follow) or 0
