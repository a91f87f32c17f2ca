"""A launch, planned: every check that touches nothing remote, and everything the launch will do.

plan() validates the options (recipe, GPUs, memory fit, infra, URLs), estimates exactly this launch,
and resolves the run's spec, the trainer's config and the SkyPilot task. It writes nothing, so
`launch --dry-run` has no side effects; gpt2cloud/launch/start.py does the writing and the launching.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import ipaddress
import math
import os
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from gpt2cloud import home
from gpt2cloud.cost.estimate import Estimate, estimate
from gpt2cloud.cost.hardware import gpu_from_device_name, parse_gpus
from gpt2cloud.cost.recipes import load_recipe
from gpt2cloud.errors import MAX_STEPS, UserError, positive
from gpt2cloud.launch import build, task
from gpt2cloud.runs import registry
from gpt2cloud.names import ANY, CLUSTER, LOCAL, MANAGED_JOB
from gpt2cloud.runs.registry import RunSpec
from gpt2cloud.store import StorageError
from gpt2cloud.store.hub import parse_hub_url
from model.config import TrainConfig

CPU = "CPU"  # the hardware table's entry for CPU ranks (local runs only)
DEFAULT_GPUS = "H100:8"  # a cloud launch without --gpus: the lecture's node
STALL_MIN_MINUTES = 20
CREDENTIAL_MARGIN = 1.5  # the estimate is of the training loop; the node also sets up, evaluates, retries
COMPILE_ALLOWANCE_S = 600  # torch.compile of a 1.5B model, the first step's allocations, a slow data read


@dataclass(frozen=True)
class Plan:
    spec: RunSpec  # the run's identity: registry record and the bucket's run.json
    est: Estimate
    train_cfg: TrainConfig  # config.json in the workdir
    node: task.NodeOptions
    task_cfg: dict  # the SkyPilot task, secrets redacted (what --dry-run prints)
    secrets: dict  # values: only in memory, only handed to SkyPilot or the local node's environment
    wheel: tuple  # (file name, bytes) of this build
    warnings: tuple = ()  # printed before the launch is confirmed

    @property
    def run_id(self) -> str:
        return self.spec.run_id


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
    if scheme == "hf":  # token shards on the Hugging Face Hub: each node downloads them itself
        if flag != "--data":
            raise UserError(f"{flag} {url}: the Hub is read-only here; the run's bucket is s3://BUCKET/PREFIX "
                            "(or, with --infra local, file:///PATH)")
        try:
            parse_hub_url(url)
        except StorageError as e:
            raise UserError(f"{flag} {e}") from None
        endpoint = os.environ.get("HF_ENDPOINT", "")
        if infra != LOCAL and endpoint and _endpoint_is_local(endpoint):
            raise UserError(f"{flag} {url}: HF_ENDPOINT {endpoint} is on this machine's loopback, which a cloud "
                            "node cannot reach; unset it (the Hub itself) or use --infra local")
        return url
    if scheme not in ("s3", "file"):
        raise UserError(f"{flag} {url}: use s3://BUCKET/PREFIX (AWS S3, R2, MinIO via AWS_ENDPOINT_URL)"
                        + (", hf://ORG/REPO[/PATH][@REVISION] (shards on the Hugging Face Hub)" if flag == "--data"
                           else "") + " or, with --infra local, file:///PATH")
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


def plan(recipe: str, gpus: Optional[str], nodes: int = 1, infra: Optional[str] = None, spot: bool = False,
         data: str = "", bucket: str = "", name: Optional[str] = None, steps: Optional[int] = None,
         max_cost: Optional[float] = None, idle_minutes: int = 10, price: Optional[float] = None,
         push_every: int = 60, offline: bool = False, max_hours: Optional[float] = None,
         micro_batch: Optional[int] = None, tokens_per_step: Optional[int] = None,
         schedule_steps: Optional[int] = None, image: Optional[str] = None) -> Plan:
    infra = normalize_infra(infra)
    r = load_recipe(recipe)
    if gpus is None:
        gpus = local_gpus() if infra == LOCAL else DEFAULT_GPUS
    gpu_type, count = parse_gpus(gpus)
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: need at least 1 node")
    # Money inputs: a nan or a negative would switch a cap off, or make the pusher spin.
    positive("--max-cost", max_cost, "300")
    positive("--max-hours", max_hours, "24")
    if schedule_steps is not None:
        positive("--schedule-steps", schedule_steps, "19073", upper=MAX_STEPS)
    positive("--idle-minutes", idle_minutes, "10")
    positive("--push-every", push_every, "60")
    if gpu_type == CPU and infra != LOCAL:
        raise UserError(f"--gpus {gpus}: CPU ranks are for --infra local; on a cloud pick a GPU type "
                        "(`gpt2cloud estimate RECIPE --compare` ranks them)")
    if infra == LOCAL:
        if nodes != 1:
            raise UserError("--infra local runs one node; drop --nodes (or launch on a cloud)")
        if spot:
            raise UserError("--infra local has no spot instances; drop --spot")
    image = check_image(image, infra)
    data = _check_url("--data", data, infra)
    bucket = _check_url("--bucket", bucket, infra)

    # The estimate for exactly this launch; a recipe that does not fit in GPU memory is refused.
    sizes = dict(gpu_type=gpu_type, gpus_per_node=count, nodes=nodes, steps=steps, micro_batch=micro_batch,
                 tokens_per_step=tokens_per_step, local=infra == LOCAL, spot=spot, idle_minutes=idle_minutes)
    est = estimate(r, price=price, **sizes)
    if not est.fits and infra != LOCAL:
        raise UserError(
            f"{r.name} needs ~{est.memory_gb_per_gpu:.1f} GiB per GPU with micro-batch {est.micro_batch}, but "
            f"{gpu_type} has {est.gpu_memory_gb:g} GiB; pick a GPU with more memory (`gpt2cloud estimate "
            f"{r.name} --compare`)" + (f" or a recipe whose micro-batch is at most {est.max_micro_batch}"
                                       if est.max_micro_batch else " (it does not fit even at micro-batch 1)"))

    clouds: list[str] = []  # with --infra any: the enabled clouds that can serve this launch (any_of)
    cloud_prices: dict = {}  # any_of: each candidate's price, so the node caps at its own cloud's
    if infra != LOCAL:
        from gpt2cloud.launch import clouds as cl

        if infra != ANY:
            cl.check_infra(infra, gpu_type, count, spot)
        else:
            try:
                clouds = cl.choose_clouds(gpu_type, count, spot)
            except UserError as e:
                if not offline or e.args[0] != cl.NO_CLOUD:
                    raise
                # a dry run without `sky check`: no infra, SkyPilot picks any enabled cloud at launch

        if price is None:  # the catalog's price for this launch, the cap's too (the table is a fallback)
            found = cl.launch_price(infra, clouds, gpu_type, count, spot)
            if found:
                est = estimate(r, price=found[0], price_source=found[1], **sizes)
                cloud_prices = found[2] if len(found[2]) > 1 else {}

    run_id = registry.check_run_id(name) if name else registry.new_run_id(r.name)
    train_cfg = r.to_train_config(
        steps=steps, schedule_steps=schedule_steps, micro_batch=est.micro_batch, tokens_per_step=tokens_per_step, max_cost_usd=max_cost or 0.0,
        price_per_gpu_hour=est.price_per_gpu_hour, max_hours=max_hours or 0.0,
        device="auto" if infra == LOCAL else "cuda", stall_minutes=stall_minutes(est),
        # MFU in the metrics needs the real peak: a local run of `--gpus H100:2` on CPU ranks has none
        peak_flops_per_gpu=0.0 if infra == LOCAL and gpu_type != CPU else est.peak_tflops_per_gpu * 1e12,
    )
    plain, secrets = task.storage_settings([data, bucket])
    endpoint = plain.get("AWS_ENDPOINT_URL_S3") or plain.get("AWS_ENDPOINT_URL")
    if infra != LOCAL and endpoint and _endpoint_is_local(endpoint):
        raise UserError(f"--bucket {bucket}: the S3 endpoint {endpoint} is on this machine's "
                        "loopback, which a cloud node cannot reach; use an endpoint the node can reach, or "
                        "--infra local")

    warnings = check_credentials(secrets, est, infra == LOCAL)

    # This exact build of the trainer, made in memory: start.py writes it into the workdir.
    wheel = build.wheel_bytes()
    spec = RunSpec(
        run_id=run_id, kind=LOCAL if infra == LOCAL else MANAGED_JOB if spot else CLUSTER, infra=infra,
        run_url=f"{bucket}/{run_id}", bucket=bucket, data_url=data, recipe=r.name, gpu_type=gpu_type,
        gpus_per_node=count, nodes=nodes, spot=spot, price_per_gpu_hour=est.price_per_gpu_hour,
        total_steps=est.steps, estimate=est, max_cost_usd=max_cost or 0.0, max_hours=max_hours or 0.0,
        idle_minutes=idle_minutes, image=image,
        build_sha256=hashlib.sha256(wheel[1]).hexdigest(),
    )
    node = task.NodeOptions(
        workdir=str(home.build_dir(run_id)), clouds=tuple(clouds), push_every=push_every,
        keep_checkpoints=train_cfg.keep_checkpoints, torch_spec=torch_spec(),
        plain_envs=tuple(sorted(plain.items())), secret_names=tuple(sorted(secrets)),
        cloud_prices=tuple(sorted(cloud_prices.items())),
    )
    return Plan(spec=spec, est=est, train_cfg=train_cfg, node=node, task_cfg=task.build_config(spec, node),
                secrets=secrets, wheel=wheel, warnings=warnings)


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
