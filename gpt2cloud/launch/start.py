"""A planned launch, carried out: check the storage the node will use, write the build, record the run,
hand it to its backend.

The run is recorded before its backend starts it, so `gpt2cloud down` finds it even if the launch is
interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import time

from gpt2cloud.backends import ACTIVE_STATES, backend_for, state_of
from gpt2cloud.errors import UserError
from gpt2cloud.launch import build, task
from gpt2cloud.launch.plan import Plan
from gpt2cloud.runs import registry
from gpt2cloud.store import NoSuchObject, StorageError, open_store
from gpt2cloud.store.layout import MANIFEST, RUN_JSON


def write_build(p: Plan) -> None:
    """The node's workdir (wheel, config.json, task.yaml): for a launch, and for `--export-yaml`."""
    build.write_workdir(p.node.workdir, p.wheel, p.train_cfg.to_json(), task.to_yaml(p.task_cfg))


def preflight(p: Plan) -> Plan:
    """Check the storage the node will use, from here: the data's manifest, the bucket writable (the
    run's spec goes there as run.json). Returns the plan to launch: with Hub data (hf://) its URL pinned
    to the commit read now, so every node and every spot recovery downloads the same bytes."""
    try:
        data = open_store(p.spec.data_url)
        data.get_bytes(MANIFEST)  # the Hub builds it from the repo's listing; S3 and files must hold one
    except NoSuchObject:
        raise UserError(f"--data {p.spec.data_url}: no {MANIFEST} there, so the node cannot verify the shards; "
                        "prepare and upload them with `gpt2cloud data prepare` and `gpt2cloud data upload DIR "
                        f"{p.spec.data_url}`") from None
    except StorageError as e:
        raise UserError(f"--data {p.spec.data_url}: cannot read it ({e})") from None
    pinned = data.pinned_url() if hasattr(data, "pinned_url") else p.spec.data_url
    if pinned != p.spec.data_url:
        spec = dataclasses.replace(p.spec, data_url=pinned)
        p = dataclasses.replace(p, spec=spec, task_cfg=task.build_config(spec, p.node))
    try:
        open_store(p.spec.run_url).put_bytes(RUN_JSON, (json.dumps(p.spec.to_dict(), indent=2) + "\n").encode())
    except StorageError as e:
        raise UserError(f"--bucket {p.spec.bucket}: the node could not write there ({e})") from None
    return p


def start(p: Plan) -> registry.RunRecord:
    """Launch, recording the run first."""
    old = registry.find(p.run_id)
    if old is not None and state_of(old) in ACTIVE_STATES:
        raise UserError(f"run '{p.run_id}' is still running; watch it with `gpt2cloud status {p.run_id}`, "
                        f"or stop it with `gpt2cloud down {p.run_id}` before launching it again")
    write_build(p)
    record = registry.RunRecord(
        spec=p.spec, started_at=time.time(),
        launches=(old.launches + 1) if old else 1, history=list(old.history) if old else [],
        fetched_dir=old.fetched_dir if old else None,  # a relaunch continues the same run
    )
    return hand_to_backend(record, p.task_cfg, p.secrets,
                           "launch" if old is None else "relaunch (resumes from the bucket)")


def hand_to_backend(record: registry.RunRecord, task_cfg: dict, secrets: dict, what: str) -> registry.RunRecord:
    """Start a recorded run (a training run or a prepare job) on its backend, noting each state as it goes."""
    registry.note(record, what, state="LAUNCHING")
    try:
        backend_for(record.spec.kind).start(record, task_cfg, secrets, save=registry.save)
    except BaseException:
        # the backend cancelled and removed what it started, or printed which cluster may still bill
        registry.note(record, "launch failed", state="LAUNCH_FAILED")
        raise
    registry.note(record, "launched", state="LAUNCHED")
    return record
