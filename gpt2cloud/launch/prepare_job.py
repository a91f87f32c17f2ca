"""`gpt2cloud data prepare SOURCE --out s3://... --on-cloud`: tokenize on a cheap cloud CPU VM.

The job is the ordinary local command run on a SkyPilot cluster of one CPU VM: `gpt2cloud data prepare
SOURCE` into the VM's disk, then `gpt2cloud data upload` of the finished set (shards first, manifest
last) to --out. The VM streams the dataset from the Hugging Face hub at cloud bandwidth and tokenizes
on all its cores, so nothing passes through the user's machine. The cluster has autostop with down
after IDLE_MINUTES: it removes itself when the job ends, whether it succeeded or failed.

Everything installs in the `run` step, not `setup`: SkyPilot keeps a cluster whose setup failed (for
debugging), while a failed run is an ended job that autodown removes. The VM gets a wheel of the whole
gpt2cloud package (the training node's wheel holds only model/ and store/) and PREPARE_REQUIREMENTS.

plan_job() checks the options and builds the estimate and the task, writing nothing (`--dry-run`);
start_job() records the job in the run registry and hands it to a backend (`status`, `logs` and
`down` then work on it); wait_job() follows its log and reads the result back from --out.

The estimate's rates are assumptions named below, except the tokenizer's, which was measured.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from gpt2cloud import home
from gpt2cloud.backends import backend_for, state_of
from gpt2cloud.errors import UserError
from gpt2cloud.launch import build, start, task
from gpt2cloud.launch.plan import normalize_infra
from gpt2cloud.runs import registry
from gpt2cloud.names import ANY, CLUSTER, LOCAL
from gpt2cloud.runs.registry import RunSpec
from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import MANIFEST

DEFAULT_CPUS = 32
MAX_CPUS = 512
MEMORY_GB_PER_CPU = 2  # tokenizer workers are small; this keeps SkyPilot off the tiniest-memory types
IDLE_MINUTES = 1  # autodown this long after the job ends (SkyPilot counts in whole minutes)
DEFAULT_DISK_GB = 256  # SkyPilot's default; more only when the shards need it

# The estimate. Measured: GPT-2 tokenizing with one worker process per core (issue 14).
TOKENS_PER_CORE_S = 3.4e6
# Assumed, not measured here (no network on the machine that wrote this):
PROVISION_S = 240  # a CPU VM up and reachable
SETUP_S = 90  # a venv and PREPARE_REQUIREMENTS from PyPI
DOWNLOAD_MB_S = 100.0  # the `datasets` library streaming parquet from the hub to a cloud VM
DOWNLOAD_BYTES_PER_TOKEN = 2.8  # fineweb-edu's parquet: ~28 GB for sample-10BT (text plus metadata columns)
UPLOAD_MB_S = 200.0  # boto3's multipart upload from a cloud VM to a bucket
TEXT_BYTES_PER_TOKEN = 4.0  # English text under GPT-2's tokenizer (a local source's size -> tokens)
SHARD_BYTES_PER_TOKEN = 2  # uint16
# When SkyPilot's catalog has no price: a typical on-demand general-purpose rate (AWS m6i: $0.048).
FALLBACK_USD_PER_CPU_HOUR = 0.048

# What `gpt2cloud data prepare` and `data upload` import on the VM (tests/test_prepare_on_cloud.py runs
# them with everything else blocked); `datasets` streams hub datasets and brings pyarrow for parquet.
PREPARE_REQUIREMENTS = ("typer>=0.12", "rich", "pydantic>=2", "numpy", "tiktoken>=0.7", "boto3", "datasets")
HF_SECRET = "HF_TOKEN"  # gated datasets; passed as a SkyPilot secret like the storage credentials

SETUP_SCRIPT = """\
# gpt2cloud prepare job: everything is installed by the run step, so that a failure there is an ended
# job, which autodown removes (SkyPilot keeps a cluster whose setup failed).
echo "gpt2cloud: prepare job on $(nproc) CPUs"
"""

RUN_SCRIPT = r"""set -euo pipefail
# gpt2cloud prepare job: tokenize SOURCE on this VM's cores, upload the set (manifest last), exit.
NODE_HOME="${GPT2CLOUD_NODE_HOME:-$HOME/.gpt2cloud-prepare}"
mkdir -p "$NODE_HOME"
if [ -n "${GPT2CLOUD_PYTHON:-}" ]; then
  PY="$GPT2CLOUD_PYTHON"  # --infra local: this machine's Python has the requirements already
else
  if [ ! -x "$NODE_HOME/venv/bin/python" ]; then
    if command -v uv >/dev/null 2>&1 || [ -x "$HOME/.local/bin/uv" ]; then
      UV="$(command -v uv || echo "$HOME/.local/bin/uv")"
      "$UV" venv --seed --python 3.11 "$NODE_HOME/venv" || "$UV" venv --seed "$NODE_HOME/venv"
    else
      python3 -m venv "$NODE_HOME/venv"
    fi
  fi
  PY="$NODE_HOME/venv/bin/python"
  "$PY" -m pip install -q --upgrade pip
  read -r -a REQUIREMENTS <<< "$GPT2CLOUD_PREPARE_REQUIREMENTS"
  "$PY" -m pip install -q "${REQUIREMENTS[@]}"
fi
rm -rf "$NODE_HOME/site"
"$PY" -m pip install -q --no-deps --no-index --target "$NODE_HOME/site" ./gpt2cloud-*.whl
export PYTHONPATH="$NODE_HOME/site${PYTHONPATH:+:$PYTHONPATH}"
ARGS=(--shard-tokens "$GPT2CLOUD_SHARD_TOKENS" --val-tokens "$GPT2CLOUD_VAL_TOKENS")
if [ -n "${GPT2CLOUD_LIMIT_TOKENS:-}" ]; then ARGS+=(--limit-tokens "$GPT2CLOUD_LIMIT_TOKENS"); fi
if [ -n "${GPT2CLOUD_SHARD_NAME:-}" ]; then ARGS+=(--name "$GPT2CLOUD_SHARD_NAME"); fi
if [ -n "${GPT2CLOUD_WORKERS:-}" ]; then ARGS+=(--workers "$GPT2CLOUD_WORKERS"); fi
echo "gpt2cloud: tokenizing $GPT2CLOUD_SOURCE (build $GPT2CLOUD_BUILD)"
"$PY" -m gpt2cloud data prepare "$GPT2CLOUD_SOURCE" --out "$NODE_HOME/shards" "${ARGS[@]}"
echo "gpt2cloud: uploading to $GPT2CLOUD_OUT"
"$PY" -m gpt2cloud data upload "$NODE_HOME/shards" "$GPT2CLOUD_OUT"
echo "gpt2cloud: prepared $GPT2CLOUD_OUT"
"""


@dataclass(frozen=True)
class PrepareEstimate:
    tokens: Optional[float]  # None: unknown (a hub dataset whose config names no size)
    tokens_from: str  # where that figure comes from
    phases: tuple  # (name, seconds, detail), in order
    usd_per_hour: float  # the VM's (0 on this machine)
    price_from: str
    cpus: int  # cores that tokenize: --cpus, or this machine's

    @property
    def seconds(self) -> Optional[float]:
        """The phases' sum, but the download and the tokenizing overlap (the VM tokenizes what it has
        streamed so far): of those two, the longer counts."""
        if self.tokens is None:
            return None
        t = dict((name, s) for name, s, _ in self.phases)
        overlapped = max(t.pop("download", 0.0), t.pop("tokenize", 0.0))
        return sum(t.values()) + overlapped

    @property
    def usd(self) -> Optional[float]:
        # billed from the VM's start to autodown, IDLE_MINUTES after the job
        s = self.seconds
        return None if s is None else (s + (IDLE_MINUTES * 60 if self.usd_per_hour else 0)) / 3600 * self.usd_per_hour


@dataclass(frozen=True)
class PrepareJob:
    spec: RunSpec  # the job in the run registry: kind, infra, run_url (= --out)
    source: str
    out: str
    cpus: int
    memory_gb: int
    disk_gb: int
    est: PrepareEstimate
    task_cfg: dict  # secrets redacted (what --dry-run prints)
    secrets: dict  # values only in memory, handed to SkyPilot or the local job's environment
    wheel: tuple  # (file name, bytes): the whole gpt2cloud package
    clouds: tuple = ()  # any_of candidates

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def workdir(self) -> str:
        return self.task_cfg["workdir"]


# ---------------------------------------------------------------- checks


def _check_out(out: str, infra: str) -> str:
    out = out.strip().rstrip("/")
    scheme = urlparse(out).scheme
    if scheme == "s3" or (scheme == "file" and infra == LOCAL):
        return out
    if scheme == "file":
        raise UserError(f"--out {out}: a cloud VM cannot write to a file:// path on this machine; use "
                        "s3://BUCKET/PREFIX (or --infra local)")
    raise UserError(f"--out {out}: with --on-cloud, --out is the bucket the VM writes to: s3://BUCKET/PREFIX "
                    "(file:///PATH with --infra local); to tokenize here, drop --on-cloud")


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


def _check_infra(infra: str) -> None:
    from gpt2cloud.launch import clouds as cl

    known = cl.known_infras()
    if infra.split("/")[0] not in known:
        raise UserError(f"--infra {infra}: unknown cloud '{infra.split('/')[0]}'; use one of {', '.join(known)} "
                        "(or a region: aws/us-east-1)")


def _cpu_clouds(cpus: int, memory_gb: int) -> list[str]:
    """The enabled clouds with a CPU-only instance of this size (a GPU-only cloud would rent a GPU VM)."""
    from gpt2cloud.launch import clouds as cl

    return [c for c in cl.enabled_clouds() if c != "ssh" and _cheapest_vm(c, cpus, memory_gb) is not False]


def _cheapest_vm(infra: str, cpus: int, memory_gb: int):
    """(USD per hour, instance type) of the cheapest CPU-only instance SkyPilot's catalog has for this size;
    False when the catalog has only GPU instances (or none) of it; None when it cannot be read."""
    from gpt2cloud.launch.clouds import sky_module

    sky = sky_module()
    cloud, _, region = infra.partition("/")
    # SkyPilot logs a failed catalog download as an error; here it only means the fallback price is used.
    quiet = logging.getLogger("sky.catalog.common")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        itype = sky.catalog.get_default_instance_type(cpus=f"{cpus}+", memory=f"{memory_gb}+",
                                                      region=region or None, clouds=cloud)
        if not itype:
            return False
        if sky.catalog.get_accelerators_from_instance_type(itype, clouds=cloud):
            return False
        price = sky.catalog.get_hourly_cost(itype, use_spot=False, region=region or None, zone=None, clouds=cloud)
    except Exception:  # noqa: BLE001 - offline with no cached catalog, a cloud without one: no price
        return None
    finally:
        quiet.setLevel(level)
    return float(price), itype


def vm_price(infra: str, clouds: list[str], cpus: int, memory_gb: int) -> tuple[float, str]:
    """(USD per hour, where it comes from): the cheapest candidate in SkyPilot's catalogs, else the fallback."""
    candidates = [infra] if infra != ANY else (clouds or ["aws", "gcp", "azure"])
    found = []
    for c in candidates:
        vm = _cheapest_vm(c, cpus, memory_gb)
        if vm:
            found.append((vm[0], f"SkyPilot catalog: {c.split('/')[0]} {vm[1]} on-demand"))
    if found:
        return min(found)
    rate = FALLBACK_USD_PER_CPU_HOUR * cpus
    return rate, (f"no catalog price here: assumed ${FALLBACK_USD_PER_CPU_HOUR}/vCPU-hour, a typical on-demand "
                  "general-purpose rate")


# ---------------------------------------------------------------- the estimate


def expected_tokens(source: str, src, limit_tokens: Optional[int]) -> tuple[Optional[float], str]:
    """How many tokens the job will write, as well as it can be known before streaming."""
    tokens, where = None, "unknown: the dataset's config names no size (pass --limit-tokens to bound it)"
    m = re.search(r":.*?(\d+(?:\.\d+)?)BT\b", source)
    if src.kind == "local":
        tokens = src.total_bytes / TEXT_BYTES_PER_TOKEN
        where = f"from the files' size, ~{TEXT_BYTES_PER_TOKEN:g} bytes a token"
    elif m:
        tokens, where = float(m.group(1)) * 1e9, f"from the config's name, {m.group(0)[1:]}"
    if limit_tokens and (tokens is None or limit_tokens < tokens):
        tokens, where = float(limit_tokens), "--limit-tokens"
    return tokens, where


def estimate_job(tokens: Optional[float], tokens_from: str, cpus: int, local: bool, hub: bool,
                 price: tuple[float, str]) -> PrepareEstimate:
    t = tokens or 0.0
    rate = TOKENS_PER_CORE_S * cpus
    tokenize = (t / rate, f"{TOKENS_PER_CORE_S / 1e6:g}M tokens/s per core x {cpus}")
    if local:
        return PrepareEstimate(tokens, tokens_from, (("tokenize",) + tokenize,), 0.0, "this machine", cpus)
    down_gb = t * DOWNLOAD_BYTES_PER_TOKEN / 1e9 if hub else 0.0
    up_gb = t * SHARD_BYTES_PER_TOKEN / 1e9
    phases = (
        ("provision", PROVISION_S, "a CPU VM up (assumed)"),
        ("setup", SETUP_S, "Python packages from PyPI (assumed)"),
        ("download", down_gb * 1e3 / DOWNLOAD_MB_S,
         f"~{down_gb:,.0f} GB of parquet streamed at {DOWNLOAD_MB_S:g} MB/s (assumed), while tokenizing"),
        ("tokenize",) + tokenize,
        ("upload", up_gb * 1e3 / UPLOAD_MB_S, f"~{up_gb:,.0f} GB of shards at {UPLOAD_MB_S:g} MB/s (assumed)"),
    )
    return PrepareEstimate(tokens, tokens_from, phases, price[0], price[1], cpus)


# ---------------------------------------------------------------- the plan


def plan_job(source: str, out: str, *, cpus: Optional[int] = None, infra: Optional[str] = None,
             name: Optional[str] = None, shard_tokens: int = 100_000_000, val_tokens: int = 10_000_000,
             limit_tokens: Optional[int] = None, workers: Optional[int] = None, offline: bool = False) -> PrepareJob:
    """Check the options and build the job: estimate, task, secrets. Writes nothing."""
    from gpt2cloud.data.prepare import default_name

    infra = normalize_infra(infra)
    local = infra == LOCAL
    if cpus is not None and not 1 <= cpus <= MAX_CPUS:
        raise UserError(f"--cpus {cpus}: must be a whole number from 1 to {MAX_CPUS}, e.g. --cpus {DEFAULT_CPUS}")
    if local and cpus is not None:
        raise UserError("--cpus sizes the cloud VM; --infra local tokenizes on this machine's cores (--workers)")
    if shard_tokens < 1 or val_tokens < 0 or (limit_tokens is not None and limit_tokens < 1):
        raise UserError("--shard-tokens and --limit-tokens must be >= 1 and --val-tokens >= 0")
    # prepare()'s own rule for --name, checked here so that a typo does not cost a VM's start-up
    if name and (not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or re.search("val|train", name)):
        raise UserError(f"--name {name!r}: use letters, digits, '-', '_' and neither 'val' nor 'train' "
                        "(the trainer tells shards apart by those words)")
    out = _check_out(out, infra)
    source, src = _check_source(source, infra)
    cpus = (os.cpu_count() or 1) if local else (cpus or DEFAULT_CPUS)
    memory_gb = cpus * MEMORY_GB_PER_CPU
    if not local and infra != ANY:
        _check_infra(infra)
        if _cheapest_vm(infra, cpus, memory_gb) is False:  # it would rent a GPU machine, or has nothing
            raise UserError(f"--infra {infra}: its catalog has no CPU-only VM with {cpus}+ vCPUs and {memory_gb}+ GB; "
                            "pick another --infra (aws, gcp, azure, ...) or fewer --cpus")

    clouds: list[str] = []
    price = (0.0, "this machine")
    if not local:
        if infra == ANY:
            clouds = _cpu_clouds(cpus, memory_gb)
            if not clouds and not offline:
                from gpt2cloud.backends.sky_errors import NO_CLOUD

                raise UserError(NO_CLOUD)
        price = vm_price(infra, clouds, cpus, memory_gb)
    tokens, tokens_from = expected_tokens(source, src, limit_tokens)
    est = estimate_job(tokens, tokens_from, workers or cpus, local, src.kind == "huggingface", price)
    shard_gb = (tokens or 0) * SHARD_BYTES_PER_TOKEN / 1e9
    disk_gb = max(DEFAULT_DISK_GB, math.ceil(shard_gb * 1.25) + 50)  # the shards sit on disk until uploaded

    run_id = registry.new_run_id(f"prep-{name or default_name(source)}")
    plain, secrets = task.storage_settings([out])
    if os.environ.get(HF_SECRET):
        secrets[HF_SECRET] = os.environ[HF_SECRET]
    wheel = whole_wheel()
    build_sha = hashlib.sha256(wheel[1]).hexdigest()
    spec = RunSpec(
        run_id=run_id, kind=LOCAL if local else CLUSTER, infra=infra, run_url=out, bucket=out, data_url=source,
        recipe="data-prepare", gpu_type="CPU", gpus_per_node=cpus, nodes=1, spot=False,
        price_per_gpu_hour=price[0] / cpus, total_steps=0, estimate=None, idle_minutes=IDLE_MINUTES,
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
    resources: dict = {"cpus": f"{cpus}+", "memory": f"{memory_gb}+", "disk_size": disk_gb,
                       "autostop": {"idle_minutes": IDLE_MINUTES, "down": True, "wait_for": "jobs"}}
    if infra not in (ANY, LOCAL):
        resources["infra"] = infra
    elif clouds:
        resources["any_of"] = [{"infra": c} for c in clouds]
    cfg = {"name": run_id, "workdir": str(home.build_dir(run_id)), "resources": resources, "envs": envs,
           "setup": SETUP_SCRIPT, "run": RUN_SCRIPT}
    if secrets:
        cfg["secrets"] = {k: None for k in sorted(secrets)}
    return PrepareJob(spec=spec, source=source, out=out, cpus=cpus, memory_gb=memory_gb, disk_gb=disk_gb, est=est,
                      task_cfg=cfg, secrets=secrets, wheel=wheel, clouds=tuple(clouds))


def whole_wheel() -> tuple[str, bytes]:
    """A wheel of the whole gpt2cloud package and model/: the CLI itself runs on the VM."""
    files = build.files_of("gpt2cloud", "gpt2cloud") + build.files_of("model", "model")
    return build.pack_wheel(files, PREPARE_REQUIREMENTS, "gpt2cloud, shipped to a `data prepare --on-cloud` VM")


def write_workdir(job: PrepareJob) -> None:
    """The VM's workdir: the wheel and the task as launched (for --export-yaml and a launch)."""
    build.write_workdir(job.workdir, job.wheel, None, task.to_yaml(job.task_cfg))


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
    return start.hand_to_backend(record, job.task_cfg, job.secrets, "prepare job launch")


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
    if manifest is None or code not in (0, None) or state.startswith("FAILED"):
        registry.note(record, f"prepare job failed ({state})", state="FAILED")
        where = ("its VM removes itself in a minute" if job.spec.kind == CLUSTER else "nothing is left running")
        raise UserError(f"the prepare job {job.run_id} ended without a complete set in {job.out} ({state}); "
                        f"`gpt2cloud logs {job.run_id}` says why; {where}")
    registry.note(record, f"prepared {len(manifest['shards'])} shards in {job.out}", state="SUCCEEDED")
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
