"""The one place that talks to SkyPilot's API server: launch, status, logs, down, cancel.

Everything here goes through the SkyPilot SDK (0.14: every call returns a request id; `sky.get` /
`sky.stream_and_get` wait for the result and re-raise SkyPilot's own exception classes). Tests replace
this module's functions with a fake that raises those same classes, so the error handling in
gpt2cloud/backends/sky_errors.py is exercised without a cloud. `import sky` happens inside each function.
"""

from __future__ import annotations

from typing import Optional


def _field(record, name):
    if isinstance(record, dict):
        return record.get(name)
    return getattr(record, name, None)


def _name(status) -> Optional[str]:
    if status is None:
        return None
    return getattr(status, "value", None) or str(status)


def launch_cluster(task, cluster_name: str, idle_minutes: int) -> Optional[int]:
    """Provision (or reuse) a cluster, run the task on it; autostop with down: nothing bills after.

    Returns the job id on the cluster. Streams SkyPilot's provisioning and setup output.
    """
    import sky

    request = sky.launch(task, cluster_name=cluster_name, idle_minutes_to_autostop=idle_minutes, down=True,
                         retry_until_up=False)
    job_id, _handle = sky.stream_and_get(request)
    return job_id


def launch_managed_job(task, name: str) -> Optional[int]:
    """A managed job (spot): SkyPilot's controller relaunches it after a preemption."""
    import sky

    job_ids, _handle = sky.stream_and_get(sky.jobs.launch(task, name=name))
    if isinstance(job_ids, (list, tuple)):
        return job_ids[0] if job_ids else None
    return job_ids


def cluster_status(cluster_name: str) -> Optional[str]:
    """UP, INIT, STOPPED, or None when the cluster does not exist (any more)."""
    import sky

    records = sky.get(sky.status(cluster_names=[cluster_name]))
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
    """PENDING, STARTING, RUNNING, RECOVERING, SUCCEEDED, FAILED, CANCELLED, ... (None if unknown)."""
    import sky

    records = sky.get(sky.jobs.queue(refresh=False, job_ids=[job_id]))
    if isinstance(records, tuple):  # newer return shape: (records, total, ...)
        records = records[0]
    for r in records or []:
        if _field(r, "job_id") == job_id:
            return _name(_field(r, "status"))
    return None


def down(cluster_name: str) -> None:
    """Tear a cluster down (raises ClusterDoesNotExist when it is gone already)."""
    import sky

    sky.get(sky.down(cluster_name))


def cancel_managed_job(job_id: int) -> None:
    import sky

    sky.get(sky.jobs.cancel(job_ids=[job_id]))


def tail_logs(cluster_name: str, job_id: Optional[int], follow: bool) -> int:
    import sky

    return sky.tail_logs(cluster_name, job_id, follow)


def tail_managed_logs(job_id: int, follow: bool) -> int:
    import sky

    return sky.jobs.tail_logs(job_id=job_id, follow=follow) or 0
