"""`gpt2cloud data prepare SOURCE --out s3://... --on-cloud`: tokenize on a cheap cloud CPU VM.

The job is the ordinary local command run on a SkyPilot cluster of one CPU VM: `gpt2cloud data prepare
SOURCE` into the VM's disk, then `gpt2cloud data upload` of the finished set (shards first, manifest
last) to --out. The VM streams the dataset from the Hugging Face hub at cloud bandwidth and tokenizes
on all its cores, so nothing passes through the user's machine. The cluster has autostop with down
after IDLE_MINUTES: it removes itself when the job ends, whether it succeeded or failed.

Everything installs in the `run` step, not `setup`: SkyPilot keeps a cluster whose setup failed (for
debugging), while a failed run is an ended job that autodown removes. The VM gets a wheel of the whole
gpt2cloud package (the training node's wheel holds only model/ and store/) and PREPARE_REQUIREMENTS.

plan_job() checks the options and returns a Job (gpt2cloud/launch/task.py), the same shape a training
launch has: one task builder, one URL check, one storage-settings path, one price (clouds.vm_price) and
its estimate from gpt2cloud/cost/prepare.py; it writes nothing (`--dry-run`). start_job() records the job
in the run registry and hands it to a backend like any launch (`status`, `logs` and `down` then work on
it); wait_job() follows its log and reads the result back from --out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt2cloud import home
from gpt2cloud.backends import backend_for, state_of
from gpt2cloud.cost import prices
from gpt2cloud.cost.prepare import disk_gb, estimate_prepare, expected_tokens
from gpt2cloud.errors import UserError
from gpt2cloud.launch import build, scripts, start, task
from gpt2cloud.launch.plan import normalize_infra
from gpt2cloud.names import ANY, CLUSTER, FAILED, LOCAL, SUCCEEDED
from gpt2cloud.runs import registry
from gpt2cloud.runs.registry import RunSpec
from gpt2cloud.store import STORES, StorageError, open_store
from gpt2cloud.store.layout import MANIFEST

DEFAULT_CPUS = 32
MAX_CPUS = 512
MEMORY_GB_PER_CPU = 2  # tokenizer workers are small; this keeps SkyPilot off the tiniest-memory types
IDLE_MINUTES = 1  # autodown this long after the job ends (SkyPilot counts in whole minutes)

# What `gpt2cloud data prepare` and `data upload` import on the VM (tests/test_prepare_on_cloud.py runs
# them with everything else blocked); `datasets` streams hub datasets and brings pyarrow for parquet;
# then each store's client library (gpt2cloud/store STORES: boto3 for s3://).
PREPARE_REQUIREMENTS = ("typer>=0.12", "rich", "pydantic>=2", "numpy", "tiktoken>=0.7", "datasets") + tuple(
    dict.fromkeys(r for scheme in STORES.values() for r in scheme.node_requirements))


@dataclass(frozen=True)
class PrepareJob(task.Planned):
    """A prepare VM, planned: its Job and what the summary shows beside it."""

    job: task.Job
    source: str
    out: str
    cpus: int
    memory_gb: int
    disk_gb: int

    @property
    def clouds(self) -> tuple:
        return self.job.resources.clouds

    @property
    def workdir(self) -> str:
        return self.job.workdir


# ---------------------------------------------------------------- checks


def _check_source(source: str, infra: str) -> tuple[str, object]:
    """(the source as the job sees it, the opened Source). A cloud VM can stream a hub dataset, not read
    this machine's files."""
    from gpt2cloud.data.sources import open_source

    src = open_source(source)
    if src.kind == "local":
        if infra != LOCAL:
            raise UserError(f"{source}: a local file or directory, which a cloud VM cannot read; --on-cloud streams "
                            "a Hugging Face dataset (owner/name:config). Tokenize local text here with `gpt2cloud "
                            "data prepare SOURCE --out DIR`, then `gpt2cloud data upload DIR s3://...`")
        source = str(Path(source).expanduser().resolve())  # the job runs in its own directory
    return source, src


def _check_options(infra: str, cpus: Optional[int], name: Optional[str], shard_tokens: int, val_tokens: int,
                   limit_tokens: Optional[int]) -> None:
    if cpus is not None and not 1 <= cpus <= MAX_CPUS:
        raise UserError(f"--cpus {cpus}: must be a whole number from 1 to {MAX_CPUS}, e.g. --cpus {DEFAULT_CPUS}")
    if infra == LOCAL and cpus is not None:
        raise UserError("--cpus sizes the cloud VM; --infra local tokenizes on this machine's cores (--workers)")
    if shard_tokens < 1 or val_tokens < 0 or (limit_tokens is not None and limit_tokens < 1):
        raise UserError("--shard-tokens and --limit-tokens must be >= 1 and --val-tokens >= 0")
    # prepare()'s own rule for --name, checked here so that a typo does not cost a VM's start-up
    if name and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or re.search("val|train", name)):
        raise UserError(f"--name {name!r}: use letters, digits, '-', '_' and neither 'val' nor 'train' "
                        "(the trainer tells shards apart by those words)")


def _where(infra: str, cpus: int, memory_gb: int, offline: bool) -> tuple[list[str], prices.Price]:
    """(any_of candidates, the VM's one price): the infra checked against SkyPilot's catalog."""
    if infra == LOCAL:
        return [], prices.Price(0.0, "this machine", per=prices.VM)
    from gpt2cloud.launch import clouds as cl

    clouds: list[str] = []
    if infra != ANY:
        known = cl.known_infras()
        if infra.split("/")[0] not in known:
            raise UserError(f"--infra {infra}: unknown cloud '{infra.split('/')[0]}'; use one of "
                            f"{', '.join(known)} (or a region: aws/us-east-1)")
        if cl.vm_offer(infra, cpus, memory_gb) is False:  # it would rent a GPU machine, or has nothing
            raise UserError(f"--infra {infra}: its catalog has no CPU-only VM with {cpus}+ vCPUs and {memory_gb}+ GB; "
                            "pick another --infra (aws, gcp, azure, ...) or fewer --cpus")
    else:
        clouds = cl.cpu_clouds(cpus, memory_gb)
        if not clouds and not offline:
            raise UserError(cl.NO_CLOUD)
    return clouds, cl.vm_price(infra, clouds, cpus, memory_gb)


# ---------------------------------------------------------------- the plan


def plan_job(source: str, out: str, *, cpus: Optional[int] = None, infra: Optional[str] = None,
             name: Optional[str] = None, shard_tokens: int = 100_000_000, val_tokens: int = 10_000_000,
             limit_tokens: Optional[int] = None, workers: Optional[int] = None, offline: bool = False) -> PrepareJob:
    """Check the options and build the job: estimate, task, secrets. Writes nothing."""
    from gpt2cloud.data.prepare import default_name

    infra = normalize_infra(infra)
    local = infra == LOCAL
    _check_options(infra, cpus, name, shard_tokens, val_tokens, limit_tokens)
    out = task.check_url("--out", out, infra, machine="VM",
                         hint="; --out is the bucket the VM writes to (to tokenize here, drop --on-cloud)")
    source, src = _check_source(source, infra)
    cpus = (os.cpu_count() or 1) if local else (cpus or DEFAULT_CPUS)
    memory_gb = cpus * MEMORY_GB_PER_CPU
    clouds, price = _where(infra, cpus, memory_gb, offline)
    tokens, tokens_from = expected_tokens(source, src.total_bytes if src.kind == "local" else None, limit_tokens)
    est = estimate_prepare(tokens, tokens_from, workers or cpus, local, src.kind == "huggingface", price,
                           0 if local else IDLE_MINUTES)
    disk = disk_gb(tokens, task.DEFAULT_DISK_GB)

    run_id = registry.new_run_id(f"prep-{name or default_name(source)}")
    plain, secrets = task.node_storage([out], infra, hub=src.kind == "huggingface", flag="--out", machine="VM")
    wheel = whole_wheel()
    build_sha = hashlib.sha256(wheel[1]).hexdigest()
    spec = RunSpec(
        run_id=run_id, kind=LOCAL if local else CLUSTER, infra=infra, run_url=out, bucket=out, data_url=source,
        recipe="data-prepare", gpu_type="CPU", gpus_per_node=cpus, nodes=1, spot=False,
        price_per_gpu_hour=price.per_gpu(cpus), total_steps=0, estimate=None, idle_minutes=IDLE_MINUTES,
        build_sha256=build_sha,
    )
    envs = {
        "GPT2CLOUD_RUN_ID": run_id, "GPT2CLOUD_SOURCE": source, "GPT2CLOUD_OUT": out,
        "GPT2CLOUD_SHARD_TOKENS": str(shard_tokens), "GPT2CLOUD_VAL_TOKENS": str(val_tokens),
        "GPT2CLOUD_LIMIT_TOKENS": str(limit_tokens or ""), "GPT2CLOUD_SHARD_NAME": name or "",
        "GPT2CLOUD_WORKERS": str(workers or ""), "GPT2CLOUD_BUILD": build_sha[:16],
        "GPT2CLOUD_PREPARE_REQUIREMENTS": " ".join(PREPARE_REQUIREMENTS),
        **{k: str(v) for k, v in sorted(plain.items())},
    }
    job = task.Job(
        spec=spec,
        resources=task.Resources(infra=infra, idle_minutes=IDLE_MINUTES, clouds=tuple(clouds), cpus=f"{cpus}+",
                                 memory=f"{memory_gb}+", disk_gb=disk),
        envs=tuple(envs.items()), secrets=secrets, setup=scripts.render(scripts.PREPARE_SETUP_SCRIPT),
        run=scripts.render(scripts.PREPARE_RUN_SCRIPT), wheel=wheel, workdir=str(home.build_dir(run_id)),
        estimate=est, price=price,
    )
    return PrepareJob(job=job, source=source, out=out, cpus=cpus, memory_gb=memory_gb, disk_gb=disk)


def whole_wheel() -> tuple[str, bytes]:
    """A wheel of the whole gpt2cloud package and model/: the CLI itself runs on the VM."""
    files = build.files_of("gpt2cloud", "gpt2cloud") + build.files_of("model", "model")
    return build.pack_wheel(files, PREPARE_REQUIREMENTS, "gpt2cloud, shipped to a `data prepare --on-cloud` VM")


def write_workdir(job: PrepareJob) -> None:
    """The VM's workdir: the wheel and the task as launched (for --export-yaml and a launch)."""
    task.write_workdir(job.job)


# ---------------------------------------------------------------- running it


def preflight(job: PrepareJob) -> None:
    """--out reachable from here with these credentials, and not already a complete set."""
    try:
        done = open_store(job.out).exists(MANIFEST)
    except StorageError as e:
        raise UserError(f"--out {job.out}: cannot read it from here ({e})") from None
    if done:
        raise UserError(f"--out {job.out} already holds a prepared set (its {MANIFEST}); use it as is (`gpt2cloud "
                        f"launch ... --data {job.out}`) or choose another --out")


def start_job(job: PrepareJob) -> registry.RunRecord:
    """Record the job (so `gpt2cloud down` finds it even if this is interrupted), then start it. A launch
    that fails or is interrupted is cleaned up by the backend, as for `gpt2cloud launch`."""
    write_workdir(job)
    record = registry.RunRecord(spec=job.spec, started_at=time.time())
    return start.hand_to_backend(record, job.job, "prepare job launch")


def wait_job(job: PrepareJob, record: registry.RunRecord, quiet: bool = False) -> dict:
    """Follow the job's log to its end (to stderr when quiet), then read the set back from --out.

    Ctrl-C stops following, not the job: it goes on and removes its VM when it ends."""
    code = None
    try:
        with redirect_stdout(sys.stderr) if quiet else nullcontext():
            code = backend_for(job.spec.kind).logs(record, follow=True)
    except KeyboardInterrupt:
        raise UserError(f"stopped following; the job goes on and removes its VM when it ends. Watch it: `gpt2cloud "
                        f"logs {job.run_id} --follow`; stop it now: `gpt2cloud down {job.run_id}`") from None
    except UserError as e:  # the log is gone (say, the VM already removed itself): --out tells the outcome
        print(f"note: {e}", file=sys.stderr)
    state = state_of(record)
    manifest = _read_manifest(job.out)
    if manifest is None or code not in (0, None) or state.startswith(FAILED):
        registry.note(record, f"prepare job failed ({state})", state=FAILED)
        where = ("its VM removes itself in a minute" if job.spec.kind == CLUSTER else "nothing is left running")
        raise UserError(f"the prepare job {job.run_id} ended without a complete set in {job.out} ({state}); "
                        f"`gpt2cloud logs {job.run_id}` says why; {where}")
    registry.note(record, f"prepared {len(manifest['shards'])} shards in {job.out}", state=SUCCEEDED)
    return {"run": job.run_id, "out": job.out, "shards": len(manifest["shards"]),
            "tokens": manifest["tokens"]["total"], "val_tokens": manifest["tokens"]["val"],
            "train_tokens": manifest["tokens"]["train"], "state": state,
            "manifest": f"{job.out}/{MANIFEST}"}


def _read_manifest(url: str) -> Optional[dict]:
    try:
        store = open_store(url)
        return json.loads(store.get_bytes(MANIFEST)) if store.exists(MANIFEST) else None
    except (StorageError, ValueError):
        return None
