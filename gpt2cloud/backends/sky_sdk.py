"""The one place that talks to SkyPilot's API server: launch, cancel, status, logs, down.

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


def launch_cluster(task, cluster_name: str, idle_minutes: int, *, dryrun: bool = False,
                   on_request: OnRequest = None) -> Optional[int]:
    """Provision (or reuse) a cluster, run the task on it; autostop with down: nothing bills after.

    Returns the job id on the cluster (None for a dry run, which only runs SkyPilot's optimizer).
    Streams SkyPilot's provisioning output.
    """
    import sky

    request = sky.launch(task, cluster_name=cluster_name, idle_minutes_to_autostop=idle_minutes, down=True,
                         retry_until_up=False, dryrun=dryrun)
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


def cancel_request(request_id: str) -> bool:
    """Cancel an API-server request (a launch still provisioning) and wait until the server has: it
    kills the request's worker and marks it CANCELLED. False when there was nothing to cancel (the
    request had finished already)."""
    import sky

    return bool(sky.get(sky.api_cancel(request_id, silent=True)))


def request_status(request_id: str) -> Optional[str]:
    """PENDING, WAITING, RUNNING, SUCCEEDED, FAILED or CANCELLED; None when the server does not know it."""
    import sky

    for r in sky.api_status([request_id]) or []:
        return _name(_field(r, "status"))
    return None


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


def managed_job_status(job_id: int) -> Optional[str]:
    """PENDING, STARTING, RUNNING, RECOVERING, SUCCEEDED, FAILED, CANCELLED, ... (None if unknown).

    Raises ClusterNotUpError when SkyPilot's jobs controller is not up (it never ran, or autostopped).
    """
    import sky

    # queue_v2 answers (records, total, status_counts, total_no_filter); the older jobs.queue is deprecated
    result = sky.get(sky.jobs.queue_v2(refresh=False, job_ids=[job_id]))
    records = result[0] if isinstance(result, tuple) else result
    for r in records or []:
        if _field(r, "job_id") == job_id:
            return _name(_field(r, "status"))
    return None


def down(cluster_name: str) -> None:
    """Tear a cluster down and wait for it (raises ClusterDoesNotExist when it is gone already)."""
    import sky

    sky.get(sky.down(cluster_name))


def managed_job_ids(name: str) -> list[int]:
    """The ids of this user's managed jobs named `name` that have not finished: how a launch interrupted
    before it learnt its job id finds the job. Raises ClusterNotUpError when the controller is not up."""
    import sky

    result = sky.get(sky.jobs.queue_v2(refresh=False, skip_finished=True, name_match=name))
    records = result[0] if isinstance(result, tuple) else result
    # name_match matches substrings (and an older server ignores it): keep exact names only
    return sorted({_field(r, "job_id") for r in records or [] if _field(r, "job_name") == name})


def cancel_managed_job(job_id: int) -> None:
    """Cancel a managed job; SkyPilot tears its cluster down. Raises ClusterNotUpError when the jobs
    controller is not up (then no managed job is in progress)."""
    import sky

    sky.get(sky.jobs.cancel(job_ids=[job_id]))


def tail_logs(cluster_name: str, job_id: Optional[int], follow: bool) -> int:
    import sky

    return sky.tail_logs(cluster_name, job_id, follow)


def tail_managed_logs(job_id: int, follow: bool) -> int:
    import sky

    return sky.jobs.tail_logs(job_id=job_id, follow=follow) or 0
