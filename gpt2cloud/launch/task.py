"""One Job shape for everything gpt2cloud launches (a training run, a `data prepare --on-cloud` VM), and
the one builder of its SkyPilot task.

A plan (gpt2cloud/launch/plan.py for training, prepare_job.py for the prepare VM) checks its options
and returns a Job: the run's spec, what to rent, plain envs, secrets (values in memory only), the node
scripts (gpt2cloud/launch/scripts.py), the wheel, the trainer's config.json and the estimate. From
there every launch goes the same way: `build_config` makes the task, `write_workdir` writes the build,
gpt2cloud/launch/start.py records the run and hands the task to its backend.

`build_config` returns the task as a plain YAML-ready dict whose secrets are all `null`: that dict is
what `--dry-run` prints and `--export-yaml` writes, so `sky launch FILE --secret AWS_ACCESS_KEY_ID
--secret AWS_SECRET_ACCESS_KEY` works as is and no secret ever reaches a file or a terminal.
gpt2cloud/backends/skypilot.py turns it into a real `sky.Task` (SkyPilot's own parser and schema),
filling the secret values in the way `sky launch --secret` does.

The storage the node reaches goes through one path too: `check_url` (what a node can reach from where
it runs) and `storage_settings` (the envs and secrets it needs for it).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

import yaml

from gpt2cloud.cost.network import NETWORK_TIER_CLOUDS, asks_for_network_tier  # noqa: F401  (task.NETWORK_TIER_CLOUDS)
from gpt2cloud.cost.prices import Price
from gpt2cloud.errors import UserError
from gpt2cloud.launch import build
from gpt2cloud.names import ANY, LOCAL
from gpt2cloud.runs.registry import RunSpec
from gpt2cloud.store import STORES, StorageError
from gpt2cloud.store.hub import parse_hub_url
from model import deadman
from model.notify import NOTIFY_ENV
from model.trackers import TRACKERS
from model.watchdog import EXIT_STALLED

# A managed job is relaunched after a preemption, after a stall (a hung rank or data read: a transient
# fault), and after a setup or trainer start-up that hung on this node (model/deadman.py RECOVERABLE says
# why those and not a hung pull or data wait, nor a full disk), never after any other failure: a bad
# config or bad data fails the same way again. SkyPilot records setup's exit code as the job's too.
JOB_RECOVERY = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 0,
                "recover_on_exit_codes": [EXIT_STALLED, *deadman.RECOVERABLE]}

# Storage and tracker credentials travel as SkyPilot secrets, never as envs, never printed; each store and
# each tracker names its own (gpt2cloud/store/__init__.py STORES, model/trackers.py TRACKERS: WANDB_API_KEY);
# so do --notify's webhook URLs (model/notify.py NOTIFY_ENV: a Slack webhook URL is a credential).
SECRET_NAMES = tuple(dict.fromkeys([*(name for scheme in STORES.values() for name in scheme.secret_envs),
                                    *(name for kind in TRACKERS.values() for name in kind.secret_envs),
                                    NOTIFY_ENV]))


DEFAULT_DISK_GB = 256  # SkyPilot's default disk: a task asks for more only when what it holds needs it


@dataclass(frozen=True)
class Resources:
    """What a job rents, and when it is given back."""

    infra: str  # cloud[/region], ANY (any_of over `clouds`) or LOCAL (this machine)
    idle_minutes: int  # autostop with down this long after the last job: nothing bills after the run
    clouds: tuple = ()  # with infra ANY: the enabled clouds that can serve the job (any_of)
    accelerators: str = ""  # "H100:8" (candidates: "H100:8,A100-80GB:8"); "" for a CPU VM
    cpus: str = ""  # "32+"
    memory: str = ""  # "64+" (GB)
    disk_gb: int = 0  # 0: SkyPilot's default
    spot: bool = False  # a managed job: its controller relaunches a preempted node (JOB_RECOVERY)
    image: str = ""  # docker:IMAGE (CUDA torch inside) or the cloud's image id; "": the cloud's default
    nodes: int = 1  # the task's num_nodes (build_config sets it from the spec): several ask for the best network


@dataclass(frozen=True)
class Job:
    """Everything one launch needs; a plan returns it and writes nothing."""

    spec: RunSpec  # the run's identity: the registry's record and the bucket's run.json
    resources: Resources
    envs: tuple  # (name, value) plain settings for the node scripts; never a secret, never money
    secrets: dict = field(repr=False)  # values only in memory, handed to SkyPilot or the local node's environment
    setup: str  # the node scripts, rendered (gpt2cloud/launch/scripts.py)
    run: str
    wheel: tuple  # (file name, bytes) of this build
    workdir: str  # what SkyPilot ships to the node: the wheel, config.json, task.yaml
    config_json: Optional[str] = None  # the trainer's config.json (a training run); money settings travel here
    estimate: object = None  # cost.estimate.Estimate or cost.prepare.PrepareEstimate, for exactly this job
    price: Optional[Price] = None  # resolved once for this launch (gpt2cloud/launch/clouds.py)
    warnings: tuple = field(default=())  # printed before the launch is confirmed

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    def with_env(self, name: str, value: str, **spec_changes) -> "Job":
        """The job with one env (and the spec fields it mirrors) changed: a pinned --data URL."""
        envs = tuple((k, value if k == name else v) for k, v in self.envs)
        return dataclasses.replace(self, envs=envs, spec=dataclasses.replace(self.spec, **spec_changes))


class Planned:
    """What a plan (training or prepare) shows of the Job it holds as `job`."""

    job: Job

    @property
    def spec(self) -> RunSpec:
        return self.job.spec

    @property
    def est(self):
        return self.job.estimate

    @property
    def task_cfg(self) -> dict:
        """The SkyPilot task, secrets redacted (what --dry-run prints)."""
        return build_config(self.job)

    @property
    def secrets(self) -> dict:
        return self.job.secrets

    @property
    def warnings(self) -> tuple:
        return self.job.warnings

    @property
    def run_id(self) -> str:
        return self.job.spec.run_id


def resources(res: Resources) -> dict:
    out: dict = {}
    if res.accelerators:
        out["accelerators"] = accelerators(res)
    out.update((k, v) for k, v in (("cpus", res.cpus), ("memory", res.memory), ("disk_size", res.disk_gb)) if v)
    # Nothing keeps billing after the run: idle_minutes after the last job (an SSH session does not
    # count), the cluster is torn down. A managed job's controller does the same to its clusters; on a
    # spot task it is also the safety net should the file be `sky launch`ed instead of `sky jobs launch`ed.
    out["autostop"] = {"idle_minutes": res.idle_minutes, "down": True, "wait_for": "jobs"}
    if res.spot:
        # A managed job: the controller relaunches a preempted node, which resumes from the bucket.
        out["use_spot"] = True
        out["job_recovery"] = dict(JOB_RECOVERY)
    if res.image:
        out["image_id"] = res.image
    if res.infra not in (ANY, LOCAL):
        out["infra"] = res.infra
    elif res.clouds:
        out["any_of"] = [{"infra": c} for c in res.clouds]
    ask_for_the_network(res, out)
    return out


# Several nodes: SkyPilot's `network_tier: best`, the fast interconnect between them, where it is known to be
# safe for this task (SkyPilot 0.14.1). On AWS it enables the EFA interfaces of the instance types that have
# them (p4d, p5; sky/clouds/aws.py), on the same instance type and image: the gradient all-reduce between nodes
# can use them rather than TCP sockets. Not asked for elsewhere:
# - Lambda, RunPod, Azure, Kubernetes (unless its cluster has a fabric), ... refuse it (their
#   CUSTOM_NETWORK_TIER is unsupported: the launch would fail, or the any_of candidate drop out);
# - GCP and Nebius swap the node's image for a docker image (GPUDirect-TCPX, nccl-tests) this setup never ran in;
# - SkyPilot refuses it beside a cloud machine image (`--image` not docker:).
# No NCCL variable is set: SkyPilot sets those a fabric needs where it sets one up (sky/provision/gcp/
# constants.py, sky/provision/kubernetes/utils.py), and NCCL picks its interface itself. NCCL_SOCKET_IFNAME in
# particular names an interface (eth0, ens5, enp...) that differs per image: a wrong one and NCCL cannot
# connect. The nodes' rendezvous needs only the master port (model/deadman.py).
# NETWORK_TIER_CLOUDS (gpt2cloud/cost/network.py) is the interconnect table's list of those clouds: the
# estimate counts a fabric only where this asks for it (asks_for_network_tier, the one rule for both).


def ask_for_the_network(res: Resources, out: dict) -> None:
    """network_tier: best for a task of several nodes, on the clouds in NETWORK_TIER_CLOUDS (any_of: on those
    candidates), not beside a cloud machine image."""
    for where in [out, *out.get("any_of", [])]:
        if "infra" in where and asks_for_network_tier(where["infra"], res.nodes, res.image):
            where["network_tier"] = "best"


def accelerators(res: Resources):
    """SkyPilot's accelerators: "H100:8"; GPU candidates ("H100:8,A100-80GB:8") as a list, which SkyPilot
    tries in the user's order, or with any_of over clouds as a set (SkyPilot takes no ordered list beside
    any_of), of which its optimizer picks the cheapest."""
    names = res.accelerators.split(",")
    if len(names) == 1:
        return names[0]
    if res.infra == ANY and res.clouds:
        return {name: int(n) for name, _, n in (a.partition(":") for a in names)}
    return names


def build_config(job: Job) -> dict:
    """The job's SkyPilot task as a YAML-ready dict; every secret's value is null (redacted)."""
    for name, _ in job.envs:
        if name in SECRET_NAMES:
            raise ValueError(f"{name} is a secret; it cannot be a plain env")
    cfg = {
        "name": job.spec.run_id,
        "workdir": job.workdir,
        "num_nodes": job.spec.nodes,
        "resources": resources(dataclasses.replace(job.resources, nodes=job.spec.nodes)),
        "envs": {k: str(v) for k, v in job.envs},
        "setup": job.setup,
        "run": job.run,
    }
    if job.secrets:
        cfg["secrets"] = {name: None for name in sorted(job.secrets)}
    return cfg


def write_workdir(job: Job) -> None:
    """The node's workdir: the wheel, config.json and the task as launched (a launch, `--export-yaml`)."""
    build.write_workdir(job.workdir, job.wheel, job.config_json,
                        to_yaml(build_config(job), retry=job.spec.retry_minutes > 0))


# ---------------------------------------------------------------- the storage a node reaches


def check_url(flag: str, url: str, infra: str, *, hub: bool = False, machine: str = "node", hint: str = "") -> str:
    """A storage URL the launched machine can use (gpt2cloud/store STORES says what each scheme allows): a
    bucket anywhere, file:// only with --infra local, a read-only one (hf://, hub=True: --data) where
    it is reachable. Returns it normalized; UserError otherwise."""
    url = url.strip().rstrip("/")
    scheme = urlparse(url).scheme
    kind = STORES.get(scheme)
    if kind is not None and not kind.writable:
        if not hub:
            raise UserError(f"{flag} {url}: the Hub is read-only here; {flag} is a bucket: s3://BUCKET/PREFIX "
                            "(or, with --infra local, file:///PATH)")
        _check_hub(flag, url, infra, machine)  # token shards on the Hugging Face Hub: each node downloads them
        return url
    if kind is None:
        raise UserError(f"{flag} {url}: use s3://BUCKET/PREFIX (AWS S3, R2, MinIO via AWS_ENDPOINT_URL)"
                        + (", hf://ORG/REPO[/PATH][@REVISION] (shards on the Hugging Face Hub)" if hub else "")
                        + " or, with --infra local, file:///PATH" + hint)
    if not kind.cloud and infra != LOCAL:
        raise UserError(f"{flag} {url}: a cloud {machine} cannot reach a file:// path on this machine; use an "
                        "s3:// bucket" + (" (`gpt2cloud data upload DIR s3://...`)" if flag == "--data" else "")
                        + " or --infra local")
    return url


def _check_hub(flag: str, url: str, infra: str, machine: str) -> None:
    try:
        parse_hub_url(url)
    except StorageError as e:
        raise UserError(f"{flag} {e}") from None
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if infra != LOCAL and endpoint and endpoint_is_local(endpoint):
        raise UserError(f"{flag} {url}: HF_ENDPOINT {endpoint} is on this machine's loopback, which a cloud "
                        f"{machine} cannot reach; unset it (the Hub itself) or use --infra local")


def endpoint_is_local(endpoint: str) -> bool:
    """An endpoint on this machine's loopback, which no cloud node can reach (a private network may be)."""
    host = urlparse(endpoint).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_storage(urls: list[str], infra: str, *, hub: bool = False, flag: str = "--bucket",
                 machine: str = "node") -> tuple[dict, dict]:
    """(plain envs, secrets) for the launched machine to reach these URLs (storage_settings), refusing an
    S3 endpoint on this machine's loopback for a cloud launch."""
    plain, secrets = storage_settings(urls, hub=hub)
    endpoint = plain.get("AWS_ENDPOINT_URL_S3") or plain.get("AWS_ENDPOINT_URL")
    if infra != LOCAL and endpoint and endpoint_is_local(endpoint):
        url = next((u for u in urls if u.startswith("s3://")), "")
        raise UserError(f"{flag} {url}: the S3 endpoint {endpoint} is on this machine's loopback, which a cloud "
                        f"{machine} cannot reach; use an endpoint the {machine} can reach, or --infra local")
    hub_endpoint = plain.get("HF_ENDPOINT", "")
    if infra != LOCAL and hub_endpoint and endpoint_is_local(hub_endpoint):
        raise UserError(f"HF_ENDPOINT {hub_endpoint} is on this machine's loopback, which a cloud {machine} cannot "
                        "reach; unset it (the Hub itself) or use --infra local")
    return plain, secrets


# ---------------------------------------------------------------- the task as a file


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper, data):
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def redact(cfg: dict) -> dict:
    """A copy with every secret value replaced by null (what a dry run shows and an export holds)."""
    out = copy.deepcopy(cfg)
    if isinstance(out.get("secrets"), dict):
        out["secrets"] = {k: None for k in out["secrets"]}
    return out


def sky_command(cfg: dict, path: str = "THIS_FILE", retry: bool = False) -> str:
    """How to launch an exported task by hand: a spot task only as a managed job, which recovers from
    preemption (a plain `sky launch` of it would be an unmanaged spot cluster)."""
    spot = cfg["resources"].get("use_spot")
    launch = "sky jobs launch" if spot else "sky launch"
    flags = "".join(f" --secret {n}" for n in (cfg.get("secrets") or {}))
    if not spot and retry:  # --retry-until-up (a managed job's controller retries anyway)
        flags += " --retry-until-up"  # by hand it has no --retry-minutes: Ctrl-C or `sky api cancel` ends it
    return f"{launch} {path}{flags}"


def to_yaml(cfg: dict, retry: bool = False) -> str:
    header = f"# Generated by gpt2cloud. Launch with\n#   {sky_command(cfg, retry=retry)}\n"
    if cfg.get("secrets"):
        header += "# Secrets are left empty on purpose: each --secret NAME takes its value from your environment.\n"
    return header + yaml.dump(redact(cfg), Dumper=_Dumper, sort_keys=False, width=1000)


def storage_settings(urls: list[str], env: Optional[dict] = None, hub: bool = False) -> tuple[dict, dict]:
    """(plain envs, secrets) the node needs to reach these storage URLs, from this environment: each
    store's plain_envs and secret_envs (gpt2cloud/store STORES) that are set.

    S3: credentials from the environment or boto3's chain (profile, ~/.aws), endpoint and region as
    plain envs. hf:// (or hub=True: a Hugging Face dataset streamed by a prepare VM): HF_TOKEN when set
    (a public repo needs none), HF_ENDPOINT as a plain env. file:// needs nothing (and only works with
    --infra local).
    """
    env = os.environ if env is None else env
    plain, secrets = {}, {}
    for scheme, kind in STORES.items():
        if any(u.startswith(f"{scheme}://") for u in urls) or (hub and scheme == "hf"):
            plain.update((k, env[k]) for k in kind.plain_envs if env.get(k))
            secrets.update((k, env[k]) for k in kind.secret_envs if env.get(k))
    if any(u.startswith("s3://") for u in urls):
        if "AWS_ACCESS_KEY_ID" not in secrets:
            creds = boto3_credentials()
            try:
                frozen = creds.get_frozen_credentials() if creds else None
            except Exception:  # noqa: BLE001 - a refresh that fails (an expired SSO login): the node gets none
                frozen = None
            if frozen and frozen.access_key:
                secrets["AWS_ACCESS_KEY_ID"] = frozen.access_key
                secrets["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
                if frozen.token:
                    secrets["AWS_SESSION_TOKEN"] = frozen.token
    return plain, secrets


def credential_expiry(env: Optional[dict] = None) -> Optional[datetime.datetime]:
    """When the S3 credentials the node gets expire: AWS_CREDENTIAL_EXPIRATION (what `aws configure
    export-credentials` sets), else boto3's refreshable credentials (SSO, assumed roles); None if unknown."""
    env = os.environ if env is None else env
    if env.get("AWS_CREDENTIAL_EXPIRATION"):
        try:
            when = datetime.datetime.fromisoformat(env["AWS_CREDENTIAL_EXPIRATION"].replace("Z", "+00:00"))
            return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            return None
    if env.get("AWS_ACCESS_KEY_ID"):
        return None  # plain environment keys: boto3 knows no expiry for them
    return getattr(boto3_credentials(), "_expiry_time", None)


def boto3_credentials():
    """boto3's credential chain (profile, ~/.aws, SSO, instance role), looked up once per AWS_* environment
    (storage_settings and credential_expiry both ask); None when there is no boto3, no credentials, or a
    broken profile."""
    return _credentials(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))


@functools.lru_cache(maxsize=4)
def _credentials(aws_env: tuple):
    try:
        import boto3

        return boto3.session.Session().get_credentials()
    except Exception:  # noqa: BLE001 - ProfileNotFound and the like: the node gets no credentials
        return None
