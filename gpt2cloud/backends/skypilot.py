"""The two SkyPilot backends: an on-demand cluster (autostop with down) and a managed job on spot.

Both go through backends/sky_sdk.py, the one module that calls SkyPilot's SDK, and map SkyPilot's
exceptions to one-line UserErrors (backends/sky_errors.py).
"""

from __future__ import annotations

import copy
from typing import Optional

from gpt2cloud.backends import sky_sdk
from gpt2cloud.backends.sky_errors import GONE, sky_errors
from gpt2cloud.errors import UserError


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
    return None if record.spec.infra == "any" else record.spec.infra


class ClusterBackend:
    """An on-demand cluster named after the run; autostop with down, so nothing bills after the run."""

    kind = "cluster"

    def start(self, record, task_cfg: dict, secrets: dict) -> None:
        spec = record.spec
        task = to_sky_task(task_cfg, secrets)
        record.cluster = spec.run_id
        with sky_errors(f"launch {spec.run_id}", infra=_where(record), gpus=f"{spec.gpu_type}:{spec.gpus_per_node}"):
            record.job_id = sky_sdk.launch_cluster(task, spec.run_id, spec.idle_minutes)

    def _name(self, record) -> str:
        return record.cluster or record.run_id

    def state(self, record) -> str:
        with sky_errors(f"status {record.run_id}"):
            cluster = sky_sdk.cluster_status(self._name(record))
            if cluster is None:
                return record.state if record.state in ("DOWN", "LAUNCH_FAILED") else "TERMINATED"
            if cluster != "UP":
                return f"CLUSTER_{cluster}"
            return sky_sdk.cluster_job_status(self._name(record), record.job_id) or "UP"

    def logs(self, record, follow: bool) -> int:
        with sky_errors(f"logs {record.run_id}", infra=record.spec.infra):
            return sky_sdk.tail_logs(self._name(record), record.job_id, follow)

    def stop(self, record) -> str:
        try:
            with sky_errors(f"down {record.run_id}", infra=record.spec.infra):
                sky_sdk.down(self._name(record))
        except UserError as e:
            if GONE not in str(e):
                raise
            return "its cluster was already gone"
        return f"tore down cluster {self._name(record)}"


class ManagedJobBackend:
    """A managed job (spot): SkyPilot's controller relaunches a preempted node, which resumes from the bucket."""

    kind = "managed-job"

    def start(self, record, task_cfg: dict, secrets: dict) -> None:
        spec = record.spec
        task = to_sky_task(task_cfg, secrets)
        with sky_errors(f"launch {spec.run_id}", infra=_where(record), gpus=f"{spec.gpu_type}:{spec.gpus_per_node}"):
            record.job_id = sky_sdk.launch_managed_job(task, spec.run_id)

    def state(self, record) -> str:
        if record.job_id is None:
            return record.state
        with sky_errors(f"status {record.run_id}"):
            return sky_sdk.managed_job_status(record.job_id) or "UNKNOWN"

    def _job_id(self, record) -> int:
        if record.job_id is None:
            raise UserError(f"run '{record.run_id}' has no managed job id (its launch did not finish); check "
                            "`sky jobs queue` and cancel it there")
        return record.job_id

    def logs(self, record, follow: bool) -> int:
        job_id = self._job_id(record)
        with sky_errors(f"logs {record.run_id}", infra=record.spec.infra):
            return sky_sdk.tail_managed_logs(job_id, follow)

    def stop(self, record) -> str:
        job_id = self._job_id(record)
        with sky_errors(f"down {record.run_id}", infra=record.spec.infra):
            sky_sdk.cancel_managed_job(job_id)
        return f"cancelled managed job {job_id} (SkyPilot tears its cluster down)"
