"""A launch, from options to a running node: checks, estimate, staged build, SkyPilot task, registry.

`plan()` does everything that touches nothing remote (recipe, GPUs, memory fit, infra checks, the
wheel and config.json in the workdir, the task config); `preflight()` checks the storage the node
will use (data manifest, bucket writable and reachable); `start()` launches through gpt2cloud/sky_sdk.py
(or the local runner) and records the run. Commands stay thin.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from gpt2cloud import registry, tasks
from gpt2cloud.errors import UserError
from gpt2cloud.estimate import Estimate, estimate
from gpt2cloud.hardware import parse_gpus
from gpt2cloud.recipes import load_recipe

LOCAL = "local"
CPU = "CPU"  # the hardware table's entry for CPU ranks (local runs only)
ANY = "any"


@dataclass
class Plan:
    run_id: str
    recipe: str
    infra: str  # a cloud (optionally /region), "any" (any_of over enabled clouds) or "local"
    kind: str  # cluster, managed-job, local
    est: Estimate
    spec: tasks.LaunchSpec
    cfg: dict  # the task config, secrets redacted
    secrets: dict  # values: only in memory, only handed to SkyPilot or the local node's environment
    bucket: str
    data_url: str
    max_cost_usd: float
    idle_minutes: int

    @property
    def run_url(self) -> str:
        return self.spec.run_url


def torch_spec() -> str:
    """Pin the node's torch to the version this trainer was built against (CUDA wheel on the node)."""
    try:
        version = importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return "torch"
    return f"torch=={version}"


def _check_url(flag: str, url: str, infra: str) -> str:
    url = url.strip().rstrip("/")
    scheme = urlparse(url).scheme
    if scheme not in ("s3", "file"):
        raise UserError(f"{flag} {url}: use s3://BUCKET/PREFIX (AWS S3, R2, MinIO via AWS_ENDPOINT_URL)"
                        " or, with --infra local, file:///PATH")
    if scheme == "file" and infra != LOCAL:
        raise UserError(f"{flag} {url}: a cloud node cannot reach a file:// path on this machine; use an "
                        "s3:// bucket (`gpt2cloud data upload DIR s3://...`) or --infra local")
    return url


def _endpoint_is_local(endpoint: str) -> bool:
    """An endpoint on this machine's loopback, which no cloud node can reach (a private network may be)."""
    host = urlparse(endpoint).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_infra(infra: Optional[str]) -> str:
    if not infra or infra.lower() == ANY:
        return ANY
    return infra.strip().lower()


def plan(recipe: str, gpus: str, nodes: int = 1, infra: Optional[str] = None, spot: bool = False,
         data: str = "", bucket: str = "", name: Optional[str] = None, steps: Optional[int] = None,
         max_cost: Optional[float] = None, idle_minutes: int = 10, price: Optional[float] = None,
         push_every: int = 60, offline: bool = False,
         micro_batch: Optional[int] = None, tokens_per_step: Optional[int] = None) -> Plan:
    infra = normalize_infra(infra)
    r = load_recipe(recipe)
    gpu_type, count = parse_gpus(gpus)
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: need at least 1 node")
    if idle_minutes < 1:
        raise UserError(f"--idle-minutes {idle_minutes}: use at least 1 (the cluster is torn down after that "
                        "many idle minutes)")
    if max_cost is not None and max_cost <= 0:
        raise UserError(f"--max-cost {max_cost}: a budget must be more than $0")
    if gpu_type == CPU and infra != LOCAL:
        raise UserError(f"--gpus {gpus}: CPU ranks are for --infra local; on a cloud pick a GPU type "
                        "(`gpt2cloud estimate RECIPE --compare` ranks them)")
    if infra == LOCAL:
        if nodes != 1:
            raise UserError("--infra local runs one node; drop --nodes (or launch on a cloud)")
        if spot:
            raise UserError("--infra local has no spot instances; drop --spot")
    data = _check_url("--data", data, infra)
    bucket = _check_url("--bucket", bucket, infra)

    # The estimate for exactly this launch; a recipe that does not fit in GPU memory is refused.
    est = estimate(r, gpu_type=gpu_type, gpus_per_node=count, nodes=nodes, price=price, steps=steps,
                   micro_batch=micro_batch, tokens_per_step=tokens_per_step)
    if not est.fits and infra != LOCAL:
        raise UserError(
            f"{r.name} needs ~{est.memory_gb_per_gpu:.1f} GiB per GPU with micro-batch {est.micro_batch}, but "
            f"{gpu_type} has {est.gpu_memory_gb:g} GiB; pick a GPU with more memory (`gpt2cloud estimate "
            f"{r.name} --compare`)" + (f" or a recipe whose micro-batch is at most {est.max_micro_batch}"
                                       if est.max_micro_batch else " (it does not fit even at micro-batch 1)"))

    clouds: list[str] = []  # with --infra any: the enabled clouds that can serve this launch (any_of)
    if infra != LOCAL:
        from gpt2cloud import clouds as cl

        if infra != ANY:
            cl.check_infra(infra, gpu_type, count, spot)
        else:
            try:
                clouds = cl.choose_clouds(gpu_type, count, spot)
            except UserError as e:
                if not offline or e.args[0] != cl.NO_CLOUD:
                    raise
                # a dry run without `sky check`: no infra, SkyPilot picks any enabled cloud at launch

    run_id = registry.check_run_id(name) if name else registry.new_run_id(r.name)
    run_url = f"{bucket}/{run_id}"

    # This exact build of the trainer, and its config, in the workdir the node receives.
    workdir = registry.home() / "builds" / run_id
    from gpt2cloud.package import build_wheel

    _, sha = build_wheel(workdir)
    train_cfg = r.to_train_config(
        steps=steps, micro_batch=micro_batch, tokens_per_step=tokens_per_step, max_cost_usd=max_cost or 0.0,
        price_per_gpu_hour=est.price_per_gpu_hour,
        # MFU in the metrics needs the real peak: a local run of `--gpus H100:2` on CPU ranks has none
        peak_flops_per_gpu=0.0 if infra == LOCAL and gpu_type != CPU else est.peak_tflops_per_gpu * 1e12,
    )
    (workdir / tasks.CONFIG_NAME).write_text(train_cfg.to_json())

    plain, secrets = tasks.storage_settings([data, bucket])
    endpoint = plain.get("AWS_ENDPOINT_URL_S3") or plain.get("AWS_ENDPOINT_URL")
    if infra != LOCAL and endpoint and _endpoint_is_local(endpoint):
        raise UserError(f"--bucket {bucket}: the S3 endpoint {endpoint} is on this machine's "
                        "loopback, which a cloud node cannot reach; use an endpoint the node can reach, or "
                        "--infra local")
    spec = tasks.LaunchSpec(
        run_id=run_id, recipe=r.name, gpu_type=gpu_type, gpus_per_node=count, nodes=nodes,
        run_url=run_url, data_url=data, workdir=str(workdir), build_sha256=sha,
        infra=None if infra in (ANY, LOCAL) else infra, clouds=clouds, spot=spot, idle_minutes=idle_minutes,
        push_every=push_every, keep_checkpoints=train_cfg.keep_checkpoints, torch_spec=torch_spec(),
        max_cost_usd=max_cost or 0.0,
        plain_envs=plain, secret_names=sorted(secrets),
    )
    kind = "local" if infra == LOCAL else "managed-job" if spot else "cluster"
    return Plan(run_id=run_id, recipe=r.name, infra=infra, kind=kind, est=est, spec=spec,
                cfg=tasks.build_config(spec), secrets=secrets, bucket=bucket, data_url=data,
                max_cost_usd=max_cost or 0.0, idle_minutes=idle_minutes)


def preflight(p: Plan) -> None:
    """Check the storage the node will use, from here: the data's manifest, the bucket writable."""
    from gpt2cloud.storage import StorageError, open_store

    try:
        data_store = open_store(p.data_url)
        has_manifest = data_store.exists("manifest.json")
    except StorageError as e:
        raise UserError(f"--data {p.data_url}: cannot read it ({e})") from None
    if not has_manifest:
        raise UserError(f"--data {p.data_url}: no manifest.json there, so the node cannot verify the shards; "
                        "prepare and upload them with `gpt2cloud data prepare` and `gpt2cloud data upload DIR "
                        f"{p.data_url}`")
    info = {"run_id": p.run_id, "recipe": p.recipe, "gpus": f"{p.est.gpu_type}:{p.est.gpus_per_node}",
            "nodes": p.est.nodes, "price_per_gpu_hour": p.est.price_per_gpu_hour, "total_steps": p.est.steps,
            "max_cost_usd": p.max_cost_usd, "launched_at": time.time(), "data_url": p.data_url,
            "build_sha256": p.spec.build_sha256}
    try:
        open_store(p.run_url).put_bytes("run.json", (json.dumps(info, indent=2) + "\n").encode())
    except StorageError as e:
        raise UserError(f"--bucket {p.bucket}: the node could not write there ({e})") from None


# What state_of says while a run is (still) under way: SkyPilot's job and managed-job states, and the
# local node's RUNNING. A cluster that is up but has no live job (CLUSTER_*, UP) is not, nor is an
# UNKNOWN state: the launch goes on, and SkyPilot reuses a live cluster.
ACTIVE_STATES = {"INIT", "PENDING", "SUBMITTED", "STARTING", "SETTING_UP", "RUNNING", "RECOVERING"}


def start(p: Plan) -> registry.RunRecord:
    """Launch, recording the run first (so `down` finds it even if the launch is interrupted)."""
    old = registry.find(p.run_id)
    if old is not None and state_of(old) in ACTIVE_STATES:
        raise UserError(f"run '{p.run_id}' is still running; watch it with `gpt2cloud status {p.run_id}`, "
                        f"or stop it with `gpt2cloud down {p.run_id}` before launching it again")
    record = registry.RunRecord(
        run_id=p.run_id, kind=p.kind, infra=p.infra, run_url=p.run_url, bucket=p.bucket, data_url=p.data_url,
        recipe=p.recipe, gpu_type=p.est.gpu_type, gpus_per_node=p.est.gpus_per_node, nodes=p.est.nodes,
        spot=p.spec.spot, price_per_gpu_hour=p.est.price_per_gpu_hour, total_steps=p.est.steps,
        started_at=time.time(), estimate=p.est.to_dict(), max_cost_usd=p.max_cost_usd,
        idle_minutes=p.idle_minutes, build_sha256=p.spec.build_sha256,
        launches=(old.launches + 1) if old else 1, history=list(old.history) if old else [],
        fetched_dir=old.fetched_dir if old else None,  # a relaunch continues the same run
    )
    registry.note(record, "launch" if old is None else "relaunch (resumes from the bucket)", state="LAUNCHING")
    # The task as launched, secrets redacted: `sky launch` takes it as is (beside the build it ships).
    (Path(p.spec.workdir) / "task.yaml").write_text(tasks.to_yaml(p.cfg))
    try:
        if p.kind == "local":
            from gpt2cloud import local_runner

            pid, d = local_runner.start(p.run_id, p.cfg, p.secrets, p.est.gpus_per_node)
            record.pid, record.local_dir = pid, str(d)
        else:
            from gpt2cloud import clouds, sky_sdk

            task = tasks.to_sky_task(p.cfg, p.secrets)
            gpus = f"{p.est.gpu_type}:{p.est.gpus_per_node}"
            with clouds.sky_errors(f"launch {p.run_id}", infra=None if p.infra == ANY else p.infra, gpus=gpus):
                if p.kind == "managed-job":
                    record.job_id = sky_sdk.launch_managed_job(task, p.run_id)
                else:
                    record.cluster = p.run_id
                    record.job_id = sky_sdk.launch_cluster(task, p.run_id, p.idle_minutes)
    except BaseException as e:
        registry.note(record, "launch failed", state="LAUNCH_FAILED")
        if p.kind != "local" and not isinstance(e, UserError):
            import sys

            print(f"note: if SkyPilot provisioned anything before this stopped, `gpt2cloud down {p.run_id}` "
                  "removes it (the task also carries autostop with down)", file=sys.stderr)
        raise
    registry.note(record, "launched", state="LAUNCHED")
    return record


def state_of(record: registry.RunRecord) -> str:
    """The run's state as SkyPilot (or the local process table) sees it now; never raises."""
    if record.kind == "local":
        from gpt2cloud import local_runner

        s = local_runner.state(record.node_dir)
        return "DOWN" if record.state == "DOWN" and s == "STOPPED" else s
    from gpt2cloud import clouds, sky_sdk

    try:
        with clouds.sky_errors(f"status {record.run_id}"):
            if record.kind == "managed-job":
                if record.job_id is None:
                    return record.state
                return sky_sdk.managed_job_status(record.job_id) or "UNKNOWN"
            cluster = sky_sdk.cluster_status(record.cluster or record.run_id)
            if cluster is None:
                return record.state if record.state in ("DOWN", "LAUNCH_FAILED") else "TERMINATED"
            if cluster != "UP":
                return f"CLUSTER_{cluster}"
            return sky_sdk.cluster_job_status(record.cluster or record.run_id, record.job_id) or "UP"
    except UserError as e:
        return f"UNKNOWN ({e})"
    except Exception as e:  # noqa: BLE001 - status must show the bucket's progress even without SkyPilot
        return f"UNKNOWN ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
