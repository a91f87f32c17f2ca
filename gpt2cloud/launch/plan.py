"""A launch, planned: every check that touches nothing remote, and everything the launch will do.

plan() validates the options (recipe, GPUs, memory fit, infra, URLs), estimates exactly this launch,
and resolves the run's spec, the trainer's config and the SkyPilot task. It writes nothing, so
`launch --dry-run` has no side effects; gpt2cloud/launch/start.py does the writing and the launching.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

from gpt2cloud import home
from gpt2cloud.cost import prices
from gpt2cloud.cost.estimate import Estimate, check_fits, check_sizes, estimate
from gpt2cloud.cost.hardware import gpu_from_device_name, gpu_spec, parse_gpu_candidates
from gpt2cloud.cost.optimizers import checkpoint_bytes
from gpt2cloud.cost.prices import Price
from gpt2cloud.cost.recipes import MAX_CHECKPOINT_MINUTES, load_recipe
from gpt2cloud.errors import MAX_STEPS, UserError, positive
from gpt2cloud.launch import build, scripts, task
from gpt2cloud.runs import registry
from gpt2cloud.names import ANY, CLUSTER, CPU, LOCAL, MANAGED_JOB
from gpt2cloud.runs.registry import RunSpec
from gpt2cloud.store.transfer import parse_manifest
from model import datadir, notify, notify_cli, trackers
from model.config import TrainConfig

DEFAULT_GPUS = "H100:8"  # a cloud launch without --gpus: the lecture's node
STALL_MIN_MINUTES = 20
CREDENTIAL_MARGIN = 1.5  # the estimate is of the training loop; the node also sets up, evaluates, retries
COMPILE_ALLOWANCE_S = 600  # torch.compile of a 1.5B model, the first step's allocations, a slow data read
# A managed (spot) job's node is removed by SkyPilot's controller as soon as the job ends, so its final
# push retries this long (a bucket outage of minutes) before the job may end with the copy only there;
# billed at the node's price: ~$6 on 8xH100 at $3/GPU-hour, a fraction of a 1558M checkpoint's worth.
SPOT_FINAL_PUSH_MINUTES = 15
# --retry-until-up: how long SkyPilot may retry for capacity (--retry-minutes; nothing bills meanwhile but
# a spot run's jobs controller), and at most a day: every wait is bounded
RETRY_MINUTES, MAX_RETRY_MINUTES = 60.0, 24 * 60.0


@dataclass(frozen=True)
class Plan(task.Planned):
    """A training launch, planned: its Job (gpt2cloud/launch/task.py) and the trainer's config in it."""

    job: task.Job
    train_cfg: TrainConfig  # config.json in the workdir (job.config_json is its text)


def torch_spec() -> str:
    """Pin the node's torch to the version this trainer was built against (CUDA wheel on the node)."""
    try:
        version = importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return "torch"
    return f"torch=={version}"


def check_image(image: Optional[str], infra: str) -> str:
    """The node image: `docker:REPO[:TAG]` (a container with CUDA torch baked in: setup skips the ~3 GB
    torch download) or a cloud machine image id, passed to SkyPilot as image_id."""
    if not image:
        return ""
    image = image.strip()
    if infra == LOCAL:
        raise UserError(f"--image {image}: --infra local runs on this machine's Python; drop --image")
    if image.startswith("docker:"):
        ref = image[len("docker:"):]
        if not ref or any(c.isspace() for c in ref) or ref.startswith(("-", ":", "/")):
            raise UserError(f"--image {image}: expected docker:REPOSITORY[:TAG], e.g. "
                            "docker:pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime")
    elif any(c.isspace() for c in image) or image.startswith("-"):
        raise UserError(f"--image {image!r}: expected docker:REPOSITORY[:TAG] or a cloud image id (e.g. ami-...)")
    return image


def stall_minutes(est: Estimate) -> float:
    """How long the node's watchdog waits for the next step, eval or checkpoint before it ends a stalled
    run: generous for compilation and evaluations, 20x the estimated step, never under STALL_MIN_MINUTES."""
    return float(max(STALL_MIN_MINUTES, math.ceil((20 * est.step_seconds + COMPILE_ALLOWANCE_S) / 60)))


def normalize_infra(infra: Optional[str]) -> str:
    if not infra or infra.lower() == ANY:
        return ANY
    return infra.strip().lower()


def local_gpus() -> str:
    """What `--infra local` runs on without --gpus: this machine's GPUs, else one rank per CPU core."""
    import torch

    if torch.cuda.is_available():
        gpu = gpu_from_device_name(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / 2**30)
        if gpu is None:
            raise UserError(f"--gpus: this machine's GPU ({torch.cuda.get_device_name(0)}) is not in the GPU table; "
                            "pass --gpus TYPE:COUNT with the closest type (`gpt2cloud estimate --help`)")
        return f"{gpu}:{torch.cuda.device_count()}"
    return f"{CPU}:{os.cpu_count() or 1}"


def check_local_gpus(gpus: str, count: int, nodes: int) -> None:
    """A GPU type on --infra local: each node gets GPUs of its own (gpt2cloud/backends/local.py node_gpu_env
    slices this machine's), so nodes x count must fit in them. Without CUDA the ranks run on CPU: no GPU to
    share."""
    import torch

    if not torch.cuda.is_available():
        return
    have = torch.cuda.device_count()
    if nodes * count > have:
        kind = gpus.split(":")[0]
        fits = f"--gpus {kind}:{have // nodes}" if have // nodes else f"--nodes {have} --gpus {kind}:1"
        raise UserError(f"--gpus {gpus} --nodes {nodes}: {nodes * count} GPUs, but this machine has {have}; each "
                        f"local node takes {count} of its own: use {fits}, or CPU ranks (--gpus CPU:N)")


def plan(recipe: str, gpus: Optional[str], nodes: int = 1, infra: Optional[str] = None, spot: bool = False,
         data: str = "", bucket: str = "", name: Optional[str] = None, steps: Optional[int] = None,
         max_cost: Optional[float] = None, idle_minutes: int = 10, price: Optional[float] = None,
         push_every: int = 60, offline: bool = False, max_hours: Optional[float] = None,
         micro_batch: Optional[int] = None, tokens_per_step: Optional[int] = None,
         schedule_steps: Optional[int] = None, image: Optional[str] = None,
         checkpoint_minutes: Optional[float] = None, retry_until_up: bool = False,
         retry_minutes: Optional[float] = None, interconnect_gbps: Optional[float] = None,
         trackers: Optional[list[str]] = None, notify: Optional[list[str]] = None) -> Plan:
    """Check every option, resolve where the run goes and its one price, estimate exactly this launch and
    build its Job. Writes nothing (`launch --dry-run`). `trackers` (--tracker) replaces the recipe's."""
    infra = normalize_infra(infra)
    retry = retry_window(retry_until_up, retry_minutes, infra)
    r = load_recipe(recipe)
    if gpus is None:
        gpus = local_gpus() if infra == LOCAL else DEFAULT_GPUS
    cands = parse_gpu_candidates(gpus)
    count = cands[0][1]
    _check_options(gpus, cands, nodes, infra, spot, max_cost, max_hours, schedule_steps, idle_minutes,
                   push_every)
    # what a preemption may lose (model/stop.py CheckpointTimer); 0 or nan would switch the timer off
    if checkpoint_minutes != 0:  # 0 turns the timer off, as in a recipe
        positive("--checkpoint-minutes", checkpoint_minutes, "10", upper=MAX_CHECKPOINT_MINUTES)
    image = check_image(image, infra)
    data = task.check_url("--data", data, infra, hub=True)
    bucket = task.check_url("--bucket", bucket, infra)
    notify_secret = node_notify(notify)

    check_sizes(steps, tokens_per_step, micro_batch, nodes)
    # Each GPU candidate: where it can go, its one price (--price, else the catalog's: any_of, the most
    # expensive cloud's; else the table's) and its estimate. The launch is estimated at its dearest.
    priced = price_candidates(r, cands, infra, spot, offline, price, nodes=nodes, steps=steps,
                              micro_batch=micro_batch, tokens_per_step=tokens_per_step, idle_minutes=idle_minutes,
                              checkpoint_minutes=checkpoint_minutes, interconnect_gbps=interconnect_gbps,
                              image=image)
    top = max(priced, key=lambda c: c.est.all_in_cost_usd)
    est, found, gpu_type = top.est, top.price, top.gpu
    clouds = list(dict.fromkeys(c for p in priced for c in p.clouds))
    several = len(priced) > 1

    if max_cost and infra != LOCAL:
        check_budget(max_cost, est)
    plain, secrets = task.node_storage([data, bucket], infra)
    tracked, tracker_plain, tracker_secrets, tracker_warnings = node_trackers(r, trackers, infra)
    plain, secrets = {**plain, **tracker_plain}, {**secrets, **tracker_secrets, **notify_secret}
    wheel = build.wheel_bytes()  # this exact build of the trainer, made in memory: start.py writes it
    run_id = registry.check_run_id(name) if name else registry.new_run_id(r.name)
    spec = RunSpec(
        run_id=run_id, kind=LOCAL if infra == LOCAL else MANAGED_JOB if spot else CLUSTER, infra=infra,
        run_url=f"{bucket}/{run_id}", bucket=bucket, data_url=data, recipe=r.name, gpu_type=gpu_type,
        gpus_per_node=count, nodes=nodes, spot=spot,
        # GPU candidates: the cap counts the dearest rate until the node knows its GPU (gpu_config)
        price_per_gpu_hour=max(p.est.price_per_gpu_hour for p in priced),
        cloud_prices={} if several else dict(found.candidates), total_steps=est.steps, estimate=est, max_cost_usd=max_cost or 0.0,
        max_hours=max_hours or 0.0, idle_minutes=idle_minutes, image=image, retry_minutes=retry,
        build_sha256=hashlib.sha256(wheel[1]).hexdigest(),
    )
    train_cfg = r.to_train_config(
        steps=steps, schedule_steps=schedule_steps, micro_batch=est.micro_batch, tokens_per_step=tokens_per_step,
        device="auto" if spec.local else "cuda", stall_minutes=stall_minutes(est),
        checkpoint_minutes=checkpoint_minutes,
        # MFU in the metrics needs the real peak: a local run of `--gpus H100:2` on CPU ranks has none
        # (GPU candidates: the node sets it from the GPU it has)
        peak_flops_per_gpu=0.0 if several or (spec.local and gpu_type != CPU) else est.peak_tflops_per_gpu * 1e12,
        gpu_candidates=gpu_config(priced) if several else {},
        launched_at=round(time.time(), 3),  # a node's billing starts no earlier (model/config.py node_up)
        trackers=tracked, **money(spec),
    )
    job = task.Job(
        spec=spec,
        resources=task.Resources(infra=infra, idle_minutes=idle_minutes, clouds=tuple(clouds),
                                 accelerators=",".join(f"{p.gpu}:{count}" for p in priced), spot=spot, image=image,
                                 disk_gb=node_disk_gb(train_cfg)),
        envs=node_envs(spec, push_every, train_cfg.keep_checkpoints, plain),
        secrets=secrets, setup=scripts.render(scripts.SETUP_SCRIPT), run=scripts.render(scripts.RUN_SCRIPT),
        wheel=wheel, workdir=str(home.build_dir(run_id)), config_json=train_cfg.to_json(), estimate=est,
        price=found, warnings=(candidates_note(gpus, priced, spec) + check_credentials(secrets, est, spec.local)
                               + tracker_warnings),
    )
    return Plan(job=job, train_cfg=train_cfg)


def _check_options(gpus, cands, nodes, infra, spot, max_cost, max_hours, schedule_steps, idle_minutes,
                   push_every) -> None:
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: need at least 1 node")
    # Money inputs: a nan or a negative would switch a cap off, or make the pusher spin.
    positive("--max-cost", max_cost, "300")
    positive("--max-hours", max_hours, "24")
    if schedule_steps is not None:
        positive("--schedule-steps", schedule_steps, "19073", upper=MAX_STEPS)
    positive("--idle-minutes", idle_minutes, "10")
    positive("--push-every", push_every, "60")
    if len(cands) > 1 and (infra == LOCAL or CPU in dict(cands)):
        raise UserError(f"--gpus {gpus}: a candidate list is for a cloud launch (SkyPilot picks one of them); "
                        "--infra local and CPU ranks take one TYPE:COUNT")
    if cands[0][0] == CPU and infra != LOCAL:
        raise UserError(f"--gpus {gpus}: CPU ranks are for --infra local; on a cloud pick a GPU type "
                        "(`gpt2cloud estimate RECIPE --compare` ranks them)")
    if infra == LOCAL:
        # --nodes N runs N nodes on this machine, each through the node's own scripts and on its own GPUs
        # (gpt2cloud/backends/local.py)
        if spot:
            raise UserError("--infra local has no spot instances; drop --spot")
        if cands[0][0] != CPU:
            check_local_gpus(gpus, cands[0][1], nodes)


@dataclass(frozen=True)
class Candidate:
    """One GPU candidate of a launch (`--gpus H100:8,A100-80GB:8`): where it can go, its price, its estimate."""

    gpu: str
    clouds: list
    price: Price
    est: Estimate


def price_candidates(r, cands, infra: str, spot: bool, offline: bool, given: Optional[float], *, nodes: int,
                     micro_batch: Optional[int], tokens_per_step: Optional[int], **kw) -> list[Candidate]:
    """Check, price and estimate each GPU candidate. Several share one config.json, so they train with the
    micro-batch that fits on all of them (the smallest each would choose)."""
    out = []
    for gpu, count in cands:
        if infra != LOCAL:  # CPU ranks on this machine are not held to a GPU's memory
            check_fits(r, gpu, count * nodes, micro_batch, tokens_per_step)
        where = _clouds(infra, gpu, count, spot, offline)
        found = prices_here(infra, where, gpu, count, spot, given)
        out.append(Candidate(gpu, where, found, None))
    if micro_batch is None and len(out) > 1:
        micro_batch = min(_estimate(r, c, cands[0][1], infra, spot, nodes, None, tokens_per_step, kw).micro_batch
                          for c in out)
    return [dataclasses.replace(c, est=_estimate(r, c, cands[0][1], infra, spot, nodes, micro_batch,
                                                 tokens_per_step, kw)) for c in out]


def _estimate(r, c: Candidate, count: int, infra: str, spot: bool, nodes: int, micro_batch, tokens_per_step,
              kw: dict) -> Estimate:
    return estimate(r, price=c.price, gpu_type=c.gpu, gpus_per_node=count, nodes=nodes, micro_batch=micro_batch,
                    tokens_per_step=tokens_per_step, local=infra == LOCAL, spot=spot, **kw)


def gpu_config(priced: list[Candidate]) -> dict:
    """config.json's gpu_candidates: what the node needs once it knows its GPU (model/config.py resolve_gpu)."""
    return {c.gpu: {"peak_flops_per_gpu": c.est.peak_tflops_per_gpu * 1e12,
                    "price_per_gpu_hour": c.est.price_per_gpu_hour, "cloud_prices": dict(c.price.candidates)}
            for c in priced}


def candidates_note(gpus: str, priced: list[Candidate], spec: RunSpec) -> tuple:
    """The line a launch over GPU candidates prints: which one it is estimated at, and the cap's rate."""
    if len(priced) < 2:
        return ()
    each = "; ".join(f"{c.gpu}:{spec.gpus_per_node} ${c.est.all_in_cost_usd:,.2f} in {c.est.all_in_hours:.1f} h "
                     f"at ${c.est.price_per_gpu_hour:.2f}/GPU-hour" for c in priced)
    return (f"--gpus {gpus}: SkyPilot picks one of them; estimated at the dearest whole run, {spec.gpu_type} ({each}); "
            f"until the node finds which GPU it has, --max-cost counts ${spec.price_per_gpu_hour:.2f}/GPU-hour, "
            "the dearest rate",)


def _clouds(infra: str, gpu_type: str, count: int, spot: bool, offline: bool) -> list[str]:
    """Check that the infra can run this launch; with --infra any, the enabled clouds that can (any_of)."""
    if infra == LOCAL:
        return []
    from gpt2cloud.launch import clouds as cl

    if infra != ANY:
        cl.check_infra(infra, gpu_type, count, spot)
        return []
    try:
        return cl.choose_clouds(gpu_type, count, spot)
    except UserError as e:
        if not offline or e.args[0] != cl.NO_CLOUD:
            raise
        return []  # a dry run without `sky check`: no infra, SkyPilot picks any enabled cloud at launch


def prices_here(infra: str, clouds: list[str], gpu_type: str, count: int, spot: bool,
                given: Optional[float]) -> Price:
    """The launch's one Price (gpt2cloud/launch/clouds.py reads SkyPilot's catalog; local runs and --price
    need no SkyPilot)."""
    if given is not None or infra == LOCAL:
        positive("--price", given, "2.99")
        return prices.given(given) if given is not None else _table_price(gpu_type)
    from gpt2cloud.launch import clouds as cl

    return cl.gpu_price(infra, clouds, gpu_type, count, spot) or _table_price(gpu_type)


def _table_price(gpu_type: str) -> Price:
    listed = prices.table_price(gpu_spec(gpu_type).name)
    if listed is None:
        raise UserError(f"no default price for {gpu_type}; pass --price USD_PER_GPU_HOUR")
    return listed


# What a cloud node bills outside its training loop, before the first step and after the stop.
OVERHEAD_PHASES = ("provisioning", "setup", "data", "compile", "finish", "idle")


def check_budget(max_cost: float, est: Estimate) -> None:
    """Refuse a --max-cost that cannot pay for the node's start-up and what bills after the stop: the run
    would bill those and stop at step 0."""
    hours = sum(est.breakdown_hours.get(phase, 0.0) for phase in OVERHEAD_PHASES)
    usd = hours * est.gpus * est.price_per_gpu_hour
    if max_cost < usd:
        raise UserError(f"--max-cost {max_cost:g}: this launch bills ~${usd:,.2f} outside its training loop "
                        f"({', '.join(OVERHEAD_PHASES)}: {hours * 60:.0f} min at ${est.price_per_gpu_hour:.2f}/GPU-hour "
                        f"on {est.gpus} GPUs), so it would stop at step 0; raise --max-cost well above that, or drop it")


def money(spec: RunSpec) -> dict:
    """The money settings of config.json, from the run's spec: one road (launch -> RunSpec -> config.json),
    which `status` reads back from the same spec. No environment variable carries or overrides them."""
    return dict(max_cost_usd=spec.max_cost_usd, price_per_gpu_hour=spec.price_per_gpu_hour,
                max_hours=spec.max_hours, cloud_prices=dict(spec.cloud_prices),
                after_stop_seconds=after_stop_seconds(spec.estimate, spec.spot))


def after_stop_seconds(est: Optional[Estimate], spot: bool = False) -> float:
    """What bills after the trainer stops (its exit and final push, then the idle minutes before autostop),
    from the launch's estimate: `--max-cost` caps the whole bill, so the budget stop leaves room for it. A
    managed (spot) job's node has no idle minutes (it goes when the job ends) but a longer final-push window
    when the bucket is down: the reserve is the larger of the two."""
    if est is None:
        return 0.0
    finish = est.breakdown_hours.get("finish", 0.0) * 3600
    if spot:
        return round(max(finish, SPOT_FINAL_PUSH_MINUTES * 60), 1)
    return round(finish + est.breakdown_hours.get("idle", 0.0) * 3600, 1)


def retry_window(retry_until_up: bool, retry_minutes: Optional[float], infra: str) -> float:
    """--retry-until-up's bound in minutes (0.0: no retrying): --retry-minutes, else RETRY_MINUTES."""
    if retry_minutes is not None and not retry_until_up:
        raise UserError(f"--retry-minutes {retry_minutes:g}: it bounds --retry-until-up; add --retry-until-up")
    if not retry_until_up:
        return 0.0
    if infra == LOCAL:
        raise UserError("--retry-until-up: --infra local has nothing to provision; drop --retry-until-up")
    positive("--retry-minutes", retry_minutes, "60", upper=MAX_RETRY_MINUTES)
    return float(retry_minutes or RETRY_MINUTES)


# WANDB_MODE values under which wandb needs no API key (the run stays in OUT/wandb on the node)
WANDB_OFFLINE = ("offline", "dryrun", "disabled")


def node_trackers(r, flag: Optional[list[str]], infra: str, env: Optional[dict] = None) -> tuple:
    """The run's trackers (--tracker, else the recipe's eval.trackers) and what the node needs for them:
    (names, plain envs, secrets, warnings). The node installs their packages (build.NODE_EXTRAS_ENV); --infra
    local runs this machine's Python, which must have them. Each tracker's settings set here go along, its
    credentials as secrets only. UserError in one line for a name the trainer does not know, a package
    missing here on --infra local, or wandb on a cloud without WANDB_API_KEY (and not offline)."""
    env = os.environ if env is None else env
    names, where = r.trackers_for(flag)
    problem = trackers.refusal(names, where, here=infra == LOCAL)
    if problem:
        raise UserError(problem)
    plain, secrets = {}, {}
    for name in names:
        kind = trackers.TRACKERS[name]
        plain.update((k, env[k]) for k in kind.plain_envs if env.get(k))
        secrets.update((k, env[k]) for k in kind.secret_envs if env.get(k))
    offline = env.get("WANDB_MODE", "").lower() in WANDB_OFFLINE
    if "wandb" in names and infra != LOCAL and "WANDB_API_KEY" not in secrets and not offline:
        raise UserError(f"{where} wandb: WANDB_API_KEY is not set here, and the node needs it to log to W&B; "
                        "export WANDB_API_KEY (https://wandb.ai/authorize; it travels as a SkyPilot secret), or "
                        "WANDB_MODE=offline to keep the W&B run on the node")
    extras = build.tracker_requirements(names)
    if extras:
        plain[build.NODE_EXTRAS_ENV] = " ".join(extras)
    return names, plain, secrets, _tracker_warnings(names, infra, plain, secrets, offline)


def _tracker_warnings(names: list, infra: str, plain: dict, secrets: dict, offline: bool) -> tuple:
    """What a cloud run's trackers keep only on the node, which goes away with it."""
    if infra == LOCAL:
        return ()
    out = []  # (tensorboard's event files go to the bucket with the metrics: `gpt2cloud fetch` brings them)
    if "wandb" in names and offline:
        out.append("--tracker wandb with WANDB_MODE=offline: the W&B run stays on the node (OUT/wandb)")
    if "trackio" in names and not (plain.get("TRACKIO_SPACE_ID") or secrets.get("TRACKIO_SERVER_URL")):
        out.append("--tracker trackio: no TRACKIO_SPACE_ID or TRACKIO_SERVER_URL here, so the node logs to its own "
                   "disk, which goes away with it; set one to follow the run")
    return tuple(out)


def check_notify(urls, flag: str = "--notify") -> list[str]:
    """--notify's URLs, each checked with the node's own rule (model/notify.py check_urls) and each once:
    UserError in one line naming `flag` (the URL redacted: a webhook URL is a credential) for one that is
    not a webhook URL. `launch`, `train` and `config set notify` all check with it."""
    try:
        return notify.check_urls(urls)
    except notify.BadURL as e:
        raise UserError(f"{flag} {e}") from None


def node_notify(urls: Optional[list[str]]) -> dict:
    """--notify's URLs as the node's secret (model/notify.py NOTIFY_ENV, one a line): a webhook URL is a
    credential, so it never becomes a plain env, a file or a line of output. UserError in one line (the URL
    redacted) for one that is not a webhook URL."""
    checked = check_notify(urls)
    return {notify.NOTIFY_ENV: "\n".join(checked)} if checked else {}


def node_envs(spec: RunSpec, push_every: int, keep_checkpoints: int, plain: dict) -> tuple:
    """The plain settings the node scripts read (never a secret, never a money setting)."""
    e = {
        "GPT2CLOUD_RUN_ID": spec.run_id,
        "GPT2CLOUD_RUN_URL": spec.run_url,
        "GPT2CLOUD_BUCKET": spec.bucket,
        "GPT2CLOUD_DATA_URL": spec.data_url,
        "GPT2CLOUD_RECIPE": spec.recipe,
        "GPT2CLOUD_BUILD": spec.build_sha256[:16] or "unknown",
        "GPT2CLOUD_PUSH_EVERY": str(push_every),
        "GPT2CLOUD_KEEP_CHECKPOINTS": str(keep_checkpoints),
        "GPT2CLOUD_TORCH_SPEC": torch_spec(),
        "GPT2CLOUD_DEVICE": "auto" if spec.local else "cuda",  # cuda: setup refuses a node whose torch sees no GPU
        "GPT2CLOUD_GPUS_PER_NODE": str(spec.gpus_per_node),
    }
    if spec.spot:  # a managed job's node goes the moment its job ends: keep trying to save the last checkpoint
        e["GPT2CLOUD_FINAL_PUSH_MINUTES"] = str(SPOT_FINAL_PUSH_MINUTES)
        e[notify_cli.MANAGED_JOB_ENV] = "1"  # its notifications say which exits SkyPilot relaunches
    e.update((k, str(v)) for k, v in sorted(plain.items()))
    return tuple(e.items())


# ---- the node's disk (SkyPilot's disk_size): what the node will hold, never less than SkyPilot's default

# SkyPilot's default disk_size. A smaller disk would save ~$0.03 an hour (256 GB of gp3 at $0.08 per
# GB-month) against a run that dies when it fills up: never below it.
# Beside the shards and checkpoints: the venv with CUDA torch and its NVIDIA libraries (~8 GB installed)
# and the uv/pip caches of their wheels (~4 GB): 15 GB; the cloud's image on the same disk (the OS, the
# NVIDIA driver, CUDA, Docker: ~30 GB on the usual GPU images; not measured here, so generous); the logs,
# metrics, timeline and HellaSwag (well under 1 GB): 5 GB.
NODE_SOFTWARE_GB, IMAGE_GB, LOGS_GB = 15, 30, 5
# Shards from the recipe's tokens (no manifest yet): 2 bytes a token (uint16), plus two llm.c shards of
# 100M tokens: the validation shard, and the last training shard the run reads only part of (it comes whole).
SHARD_SLACK_BYTES = 2 * 2 * 100_000_000
def shard_bytes(cfg: TrainConfig, files: Optional[list] = None) -> int:
    """The shards the node downloads: from the data's manifest, exactly those the run's steps read (the node
    picks them the same way: model/datadir.py files_to_read); without one, from the recipe's tokens."""
    if files is not None:
        return sum(f["size"] for f in datadir.files_to_read(files, cfg.steps, cfg.tokens_per_step))
    return 2 * cfg.steps * cfg.tokens_per_step + SHARD_SLACK_BYTES


def node_disk_gb(cfg: TrainConfig, files: Optional[list] = None) -> int:
    """disk_size for each node (every node holds its own copy of the shards): the shards, keep_checkpoints
    + 1 checkpoints (a new one is written before the oldest is pruned; the pulled one is among them), the
    venv, the image and the logs; at least task.DEFAULT_DISK_GB."""
    held = shard_bytes(cfg, files) + (max(cfg.keep_checkpoints, 1) + 1) * checkpoint_bytes(cfg.model, cfg.optimizer)
    return max(task.DEFAULT_DISK_GB, math.ceil(held / 1e9) + NODE_SOFTWARE_GB + IMAGE_GB + LOGS_GB)


def with_data_manifest(p: Plan, manifest: bytes) -> Plan:
    """The plan with its disk sized from the data's manifest (preflight reads it), not from the recipe."""
    files = parse_manifest(manifest, "the data's manifest")["files"]
    resources = dataclasses.replace(p.job.resources, disk_gb=node_disk_gb(p.train_cfg, files))
    return dataclasses.replace(p, job=dataclasses.replace(p.job, resources=resources))


def with_data_url(p: Plan, url: str) -> Plan:
    """The plan with --data pinned to one commit of the Hub (every node and recovery reads the same bytes)."""
    return dataclasses.replace(p, job=p.job.with_env("GPT2CLOUD_DATA_URL", url, data_url=url))


def check_credentials(secrets: dict, est: Estimate, local: bool) -> tuple:
    """Temporary S3 credentials travel frozen into the task (spot recoveries reuse them): refuse those
    that expire before the run's estimated end; warn about those whose expiry is unknown."""
    if "AWS_SESSION_TOKEN" not in secrets or local:
        return ()
    hours = est.wall_hours * CREDENTIAL_MARGIN + 1  # start-up, evaluations, a recovery or two
    expiry = task.credential_expiry()
    if expiry is None:
        return (f"the S3 credentials are temporary (AWS_SESSION_TOKEN) and their expiry is unknown: if they expire "
                f"before the run ends (~{hours:.1f} h), the node can no longer push checkpoints; long-lived keys "
                "(an IAM user's access key, an R2 API token) are safer",)
    left = (expiry - datetime.datetime.now(datetime.timezone.utc)).total_seconds() / 3600
    if left < hours:
        raise UserError(f"the S3 credentials expire in {max(left, 0):.1f} h ({expiry:%Y-%m-%d %H:%M} UTC), before the "
                        f"run's estimated end (~{hours:.1f} h): the node could not push its checkpoints after that; use "
                        "long-lived keys (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of an IAM user, an R2 API token) "
                        "or credentials valid for longer")
    return ()
