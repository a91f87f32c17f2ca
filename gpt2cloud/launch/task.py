"""The SkyPilot task for a training run: resources, setup and run scripts, envs and (redacted) secrets.

`build_config` returns the task as a plain YAML-ready dict whose secrets are all `null`: that dict is
what `--dry-run` prints and `--export-yaml` writes, so `sky launch FILE --secret AWS_ACCESS_KEY_ID
--secret AWS_SECRET_ACCESS_KEY` works as is and no secret ever reaches a file or a terminal.
gpt2cloud/backends/skypilot.py turns it into a real `sky.Task` (SkyPilot's own parser and schema),
filling the secret values in the way `sky launch --secret` does. The same two scripts run on `--infra local`.
The scripts are rendered from the constants below (@NAME@ placeholders), so a path, port or exit code
has one definition.
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
from dataclasses import dataclass
from typing import Optional

import yaml

from gpt2cloud.launch.build import NODE_REQUIREMENTS
from gpt2cloud.names import ANY, LOCAL
from gpt2cloud.runs.registry import RunSpec
from gpt2cloud.store.layout import CONFIG, LOGS, NODE_HOME, TIMELINE
from model.datadir import STATUS as DATA_STATUS  # the data download's status file
from model.sync import EXIT_BUCKET, EXIT_DATA, EXIT_FINAL_PUSH  # the exit codes of the node's sync steps
from model.watchdog import EXIT_STALLED, STALLED


NODE_HOME_DEFAULT = f"$HOME/{NODE_HOME}"
MASTER_PORT = 8008
# A managed job is relaunched after a preemption, and after a stall (a hung rank or data read: a
# transient fault), never after any other failure: a bad config or bad data fails the same way again.
JOB_RECOVERY = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 0, "recover_on_exit_codes": [EXIT_STALLED]}
# CUDA builds of torch on PyTorch's wheel index, newest first: the node takes the newest its driver runs.
TORCH_CUDA_BUILDS = ("130", "128", "126")
TORCH_INDEX = "https://download.pytorch.org/whl"
EXIT_NO_GPU = 6  # setup: torch sees fewer GPUs than SkyPilot gave the node
HARD_LIMIT_GRACE_S = 600  # --max-hours: the trainer stops itself; the node kills it this much later

# Storage credentials: passed as SkyPilot secrets, never as envs, never printed.
S3_SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Storage settings that are not secret and travel as plain envs.
S3_PLAIN_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")
# --data hf://...: the Hub token (private and gated repos) is a secret, a mirror's address is not.
HUB_SECRET_NAMES = ("HF_TOKEN",)
HUB_PLAIN_ENVS = ("HF_ENDPOINT",)
SECRET_NAMES = S3_SECRET_NAMES + HUB_SECRET_NAMES

SETUP_SCRIPT = r"""set -euo pipefail
# gpt2cloud node setup: the trainer's dependencies (never skypilot) and this exact build of the trainer.
# Fast paths, in order: dependencies already installed on this node (a relaunch: nothing to do); a baked
# image whose Python has CUDA torch (--image docker:...: torch is not downloaded again); uv, which fetches
# the ~3 GB of CUDA wheels in parallel (pip when uv is not to be had). Each part's span goes to the timeline.
NODE_HOME="${GPT2CLOUD_NODE_HOME:-@NODE_HOME_DEFAULT@}"
mkdir -p "$NODE_HOME"
: > "$NODE_HOME/setup_times"
part() {  # part NAME START: a line "NAME START END" that the run script turns into timeline events
  echo "$1 $2 $(date +%s.%N)" >> "$NODE_HOME/setup_times"
}
SETUP_START="$(date +%s.%N)"
: "${GPT2CLOUD_TORCH_SPEC:=torch}"  # the task sets the exact pin; a hand-run setup gets the latest
DEPS="$GPT2CLOUD_TORCH_SPEC @NODE_DEPS@"
if [ -n "${GPT2CLOUD_PYTHON:-}" ]; then
  PY="$GPT2CLOUD_PYTHON"  # --infra local: this machine's Python already has every dependency
elif [ -x "$NODE_HOME/venv/bin/python" ] && [ "$(cat "$NODE_HOME/deps" 2>/dev/null)" = "$DEPS" ]; then
  PY="$NODE_HOME/venv/bin/python"
  echo "gpt2cloud: dependencies already on this node ($DEPS)"
else
  T="$(date +%s.%N)"
  rm -rf "$NODE_HOME/venv" "$NODE_HOME/deps"
  VENV_FLAGS=()
  if python3 -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    VENV_FLAGS=(--system-site-packages)  # a baked image: its CUDA torch is the one to use
    BAKED_TORCH="$(python3 -c 'import torch; print(torch.__version__)')"
  fi
  python3 -m venv "${VENV_FLAGS[@]}" "$NODE_HOME/venv"
  PY="$NODE_HOME/venv/bin/python"
  INSTALL=("$PY" -m pip install -q)
  if "$PY" -m pip install -q uv 2>/dev/null && "$PY" -m uv --version >/dev/null 2>&1; then
    INSTALL=("$PY" -m uv pip install -q --python "$PY")
  fi
  part venv "$T"
  T="$(date +%s.%N)"
  if [ -n "${BAKED_TORCH:-}" ]; then
    echo "gpt2cloud: torch $BAKED_TORCH from the image"
  else
    # torch built for a CUDA the driver runs: `nvidia-smi` names the newest CUDA the driver supports.
    DRIVER_CUDA="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]\).*/\1\2/p' | head -n1)"
    TORCH_INDEX=()
    for CU in @TORCH_CUDA_BUILDS@; do
      if [ -n "$DRIVER_CUDA" ] && [ "$DRIVER_CUDA" -ge "$CU" ]; then
        if [ "${INSTALL[2]}" = uv ]; then TORCH_INDEX=(--torch-backend "cu$CU")
        else TORCH_INDEX=(--index-url "@TORCH_INDEX@/cu$CU" --extra-index-url https://pypi.org/simple); fi
        break
      fi
    done
    echo "gpt2cloud: driver supports CUDA ${DRIVER_CUDA:-unknown}; torch ${TORCH_INDEX[1]:-from PyPI} via ${INSTALL[2]}"
    "${INSTALL[@]}" "${TORCH_INDEX[@]}" "$GPT2CLOUD_TORCH_SPEC"
  fi
  part torch "$T"
  T="$(date +%s.%N)"
  "${INSTALL[@]}" @NODE_DEPS@
  echo "$DEPS" > "$NODE_HOME/deps"
  part deps "$T"
fi
if [ "${GPT2CLOUD_DEVICE:-auto}" = cuda ]; then
  T="$(date +%s.%N)"
  # Fail in seconds, not after an hour of billing on CPU: torch must see every GPU this node was given.
  "$PY" -c 'import os, sys, torch
want = int(os.environ["GPT2CLOUD_GPUS_PER_NODE"])
seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
if seen != want:
    sys.exit(f"gpt2cloud: torch {torch.__version__} (CUDA {torch.version.cuda}) sees {seen} of the {want} GPUs this "
             "node was given: the torch build does not match the driver (nvidia-smi); the job stops here")
print(f"gpt2cloud: torch {torch.__version__} sees {seen} GPUs ({torch.cuda.get_device_name(0)})")' || exit @EXIT_NO_GPU@
  part gpu_check "$T"
fi
# This build of the trainer, from the wheel in the workdir: no network.
T="$(date +%s.%N)"
rm -rf "$NODE_HOME/site"
"$PY" -m pip install -q --no-deps --no-index --target "$NODE_HOME/site" ./gpt2cloud-*.whl
echo "$PY" > "$NODE_HOME/python"
part wheel "$T"
part setup "$SETUP_START"
echo "gpt2cloud: node ready ($("$PY" --version 2>&1), build $GPT2CLOUD_BUILD)"
"""

RUN_SCRIPT = r"""set -uo pipefail
# gpt2cloud run: resume from the bucket, sync OUT to it while training, push once more at the end.
NODE_HOME="${GPT2CLOUD_NODE_HOME:-@NODE_HOME_DEFAULT@}"
PY="$(cat "$NODE_HOME/python")"
export PYTHONPATH="$NODE_HOME/site${PYTHONPATH:+:$PYTHONPATH}"
RANK="${SKYPILOT_NODE_RANK:-0}"
OUT="$NODE_HOME/out"
DATA="$NODE_HOME/data"
mkdir -p "$OUT/@LOGS@"
# A fresh node resumes from the newest complete checkpoint in the bucket (sha256-verified).
PULL_START="$(date +%s.%N)"
"$PY" -m model.sync pull "$GPT2CLOUD_RUN_URL" "$OUT" --rank "$RANK" || exit @EXIT_BUCKET@
exec > >(tee -a "$OUT/@LOGS@/node-$RANK.log") 2>&1
echo "gpt2cloud: run $GPT2CLOUD_RUN_ID, node $RANK of $SKYPILOT_NUM_NODES, $SKYPILOT_NUM_GPUS_PER_NODE GPUs"
stop_within() {  # stop_within SECONDS PID: SIGTERM, then SIGKILL if it is still there: a bounded wait
  kill -TERM "$2" 2>/dev/null
  for _ in $(seq $(($1 * 10))); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$2" 2>/dev/null; wait "$2" 2>/dev/null
}
note() {  # a line of the node's timeline (node 0's is pushed): note EVENT [more JSON fields]
  printf '{"event": "%s", "time": %s%s}\n' "$1" "$(date +%s.%N)" "${2:+, $2}" >> "$OUT/@TIMELINE@"
}
# Billing starts when the node comes up: its boot time (the launch time on --infra local). The trainer
# counts its budget and time limit from here, plus the earlier attempts' node time.
export GPT2CLOUD_NODE_UP="${GPT2CLOUD_NODE_UP:-$(awk -v now="$(date +%s.%N)" '{printf "%.3f", now - $1}' /proc/uptime)}"
if [ -n "${GPT2CLOUD_CLOUD_PRICES:-}" ]; then  # any_of: the price of the cloud this node landed on
  export GPT2CLOUD_PRICE_PER_GPU_HOUR="$("$PY" -c 'import json, os
cloud = str(json.loads(os.environ.get("SKYPILOT_CLUSTER_INFO") or "{}").get("cloud", "")).lower()
print(json.loads(os.environ["GPT2CLOUD_CLOUD_PRICES"]).get(cloud, ""))')"
fi
printf '{"event": "node_up", "time": %s, "rank": %s, "price_per_gpu_hour": %s}\n' "$GPT2CLOUD_NODE_UP" "$RANK" \
  "${GPT2CLOUD_PRICE_PER_GPU_HOUR:-null}" >> "$OUT/@TIMELINE@"
# the setup's span, with its parts' seconds (venv, torch, deps, gpu_check, wheel: what to speed up next)
if read -r _ SETUP_START SETUP_END < <(grep '^setup ' "$NODE_HOME/setup_times" 2>/dev/null); then
  PARTS="$(awk '$1 != "setup" {printf "%s\"%s\": %.3f", (n++ ? ", " : ""), $1, $3 - $2}' "$NODE_HOME/setup_times")"
  printf '{"event": "setup", "time": %s, "start": %s, "parts": {%s}}\n' "$SETUP_END" "$SETUP_START" "$PARTS" \
    >> "$OUT/@TIMELINE@"
fi
note pull "\"start\": $PULL_START"
# The shards stream in the background, in the order the trainer reads them (model/sync.py data); the
# trainer starts once the validation shards and the first training shard are in, and its loader waits
# for a shard still on its way. "data" is that wait (the critical path); data_complete comes when all are in.
DATA_START="$(date +%s.%N)"
rm -f "$DATA/@DATA_STATUS@"
"$PY" -m model.sync data "$GPT2CLOUD_DATA_URL" "$DATA" --timeline "$OUT/@TIMELINE@" \
  ${GPT2CLOUD_DATA_MAX_MB_PER_S:+--max-mb-per-s "$GPT2CLOUD_DATA_MAX_MB_PER_S"} &
DOWNLOADER=$!
trap 'kill -TERM "$DOWNLOADER" 2>/dev/null' EXIT  # however the script ends, the download ends with it
DATA_BYTES="$("$PY" -m model.sync wait "$DATA" --pid "$DOWNLOADER")" || exit @EXIT_DATA@
note data "\"start\": $DATA_START, \"bytes\": $DATA_BYTES"
"$PY" -m model.sync push "$OUT" "$GPT2CLOUD_RUN_URL" --rank "$RANK" --every "$GPT2CLOUD_PUSH_EVERY" \
  --keep "$GPT2CLOUD_KEEP_CHECKPOINTS" --retry-seconds "${GPT2CLOUD_PUSH_RETRY_SECONDS:-5}" &
PUSHER=$!
MASTER_ADDR="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"
rm -f "$OUT/@STALLED@"
LIMIT=()  # --max-hours: a hard stop for a trainer that would not stop itself
if [ "${GPT2CLOUD_MAX_SECONDS:-0}" != 0 ]; then LIMIT=(timeout --kill-after=60 "$GPT2CLOUD_MAX_SECONDS"); fi
note train_start
"${LIMIT[@]}" "$PY" -m torch.distributed.run --nnodes="$SKYPILOT_NUM_NODES" --nproc_per_node="$SKYPILOT_NUM_GPUS_PER_NODE" \
  --node_rank="$RANK" --master_addr="$MASTER_ADDR" --master_port="${GPT2CLOUD_MASTER_PORT:-@MASTER_PORT@}" \
  -m model.train --config @CONFIG@ --data "$DATA" --out "$OUT" --resume auto &
TRAINER=$!
trap 'kill -TERM "$TRAINER" 2>/dev/null' TERM INT
wait "$TRAINER"; RC=$?
if kill -0 "$TRAINER" 2>/dev/null; then wait "$TRAINER"; RC=$?; fi
echo "gpt2cloud: trainer exited with code $RC"
note train_end "\"code\": $RC"
# The trainer is done with the data: a download still going stops here. Its failure is the job's only
# when the trainer failed too (its loader then said which shard never came).
stop_within 30 "$DOWNLOADER"
if [ "$RC" -ne 0 ] && grep -q '"state": "failed"' "$DATA/@DATA_STATUS@" 2>/dev/null; then
  echo "gpt2cloud: the data download failed (see $DATA/@DATA_STATUS@); exit @EXIT_DATA@"
  RC=@EXIT_DATA@
fi
if [ -f "$OUT/@STALLED@" ]; then
  echo "gpt2cloud: the trainer stalled ($(cat "$OUT/@STALLED@") was the last thing it finished); exit @EXIT_STALLED@"
  RC=@EXIT_STALLED@
fi
note final_push
kill -TERM "$PUSHER" 2>/dev/null
# Not cut short: the final push carries the last checkpoint (GBs); each request has a read timeout and
# the push FINAL_TRIES attempts with backoff (model/sync.py), so this wait ends on its own.
wait "$PUSHER"; PUSHED=$?
if [ "$PUSHED" -ne 0 ]; then
  echo "gpt2cloud: FINAL PUSH FAILED: the newest checkpoint is only on this node, in $OUT. Copy it before autostop"
  echo "gpt2cloud: removes the node: rsync -a $GPT2CLOUD_RUN_ID:$OUT/ runs/$GPT2CLOUD_RUN_ID/"
  if [ "$RC" -eq 0 ]; then RC=@EXIT_FINAL_PUSH@; fi
fi
exit "$RC"
"""


def render(script: str) -> str:
    """A node script with its @NAME@ placeholders filled from the constants."""
    values = {"NODE_HOME_DEFAULT": NODE_HOME_DEFAULT, "MASTER_PORT": MASTER_PORT, "EXIT_DATA": EXIT_DATA,
              "EXIT_BUCKET": EXIT_BUCKET, "EXIT_FINAL_PUSH": EXIT_FINAL_PUSH, "EXIT_STALLED": EXIT_STALLED,
              "EXIT_NO_GPU": EXIT_NO_GPU, "STALLED": STALLED, "LOGS": LOGS, "CONFIG": CONFIG, "TIMELINE": TIMELINE,
              "DATA_STATUS": DATA_STATUS,
              "TORCH_CUDA_BUILDS": " ".join(TORCH_CUDA_BUILDS), "TORCH_INDEX": TORCH_INDEX,
              "NODE_DEPS": " ".join(NODE_REQUIREMENTS)}
    for name, value in values.items():
        script = script.replace(f"@{name}@", str(value))
    return script


@dataclass(frozen=True)
class NodeOptions:
    """What the task needs beside the run's spec: the shipped workdir and how the node syncs."""

    workdir: str  # holds the wheel and config.json
    clouds: tuple = ()  # with no infra in the spec: any_of over these enabled clouds
    push_every: int = 60
    keep_checkpoints: int = 3
    torch_spec: str = "torch"
    plain_envs: tuple = ()  # (name, value) of non-secret storage settings (endpoint, region)
    secret_names: tuple = ()  # storage credentials; their values are never stored here
    cloud_prices: tuple = ()  # any_of: (cloud, USD per GPU-hour) of each candidate, for the node's own cap


def resources(spec: RunSpec, node: NodeOptions) -> dict:
    res: dict = {"accelerators": f"{spec.gpu_type}:{spec.gpus_per_node}"}
    # Nothing keeps billing after the run: idle_minutes after the last job (an SSH session does not
    # count), the cluster is torn down. A managed job's controller does the same to its clusters; on a
    # spot task it is also the safety net should the file be `sky launch`ed instead of `sky jobs launch`ed.
    res["autostop"] = {"idle_minutes": spec.idle_minutes, "down": True, "wait_for": "jobs"}
    if spec.spot:
        # A managed job: the controller relaunches a preempted node, which resumes from the bucket.
        res["use_spot"] = True
        res["job_recovery"] = dict(JOB_RECOVERY)
    if spec.image:  # a baked node: docker:IMAGE (CUDA torch inside) or the cloud's image id
        res["image_id"] = spec.image
    if spec.infra not in (ANY, LOCAL):
        res["infra"] = spec.infra
    elif node.clouds:
        res["any_of"] = [{"infra": c} for c in node.clouds]
    return res


def envs(spec: RunSpec, node: NodeOptions) -> dict:
    e = {
        "GPT2CLOUD_RUN_ID": spec.run_id,
        "GPT2CLOUD_RUN_URL": spec.run_url,
        "GPT2CLOUD_BUCKET": spec.bucket,
        "GPT2CLOUD_DATA_URL": spec.data_url,
        "GPT2CLOUD_RECIPE": spec.recipe,
        "GPT2CLOUD_BUILD": spec.build_sha256[:16] or "unknown",
        "GPT2CLOUD_PUSH_EVERY": str(node.push_every),
        "GPT2CLOUD_KEEP_CHECKPOINTS": str(node.keep_checkpoints),
        "GPT2CLOUD_TORCH_SPEC": node.torch_spec,
        "GPT2CLOUD_DEVICE": "auto" if spec.local else "cuda",  # cuda: setup refuses a node whose torch sees no GPU
        "GPT2CLOUD_GPUS_PER_NODE": str(spec.gpus_per_node),
    }
    if node.cloud_prices:
        e["GPT2CLOUD_CLOUD_PRICES"] = json.dumps(dict(node.cloud_prices))
    if spec.max_hours:
        e["GPT2CLOUD_MAX_SECONDS"] = str(int(spec.max_hours * 3600) + HARD_LIMIT_GRACE_S)
    if spec.max_cost_usd:  # informational: the cap itself is in config.json, enforced by the trainer
        e["GPT2CLOUD_MAX_COST_USD"] = f"{spec.max_cost_usd:g}"
    for k, v in sorted(node.plain_envs):
        if k in SECRET_NAMES:
            raise ValueError(f"{k} is a secret; it cannot be a plain env")
        e[k] = str(v)
    return e


def build_config(spec: RunSpec, node: NodeOptions) -> dict:
    """The task as a YAML-ready dict; every secret's value is null (redacted)."""
    cfg = {
        "name": spec.run_id,
        "workdir": node.workdir,
        "num_nodes": spec.nodes,
        "resources": resources(spec, node),
        "envs": envs(spec, node),
        "setup": render(SETUP_SCRIPT),
        "run": render(RUN_SCRIPT),
    }
    if node.secret_names:
        cfg["secrets"] = {name: None for name in node.secret_names}
    return cfg


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


def sky_command(cfg: dict, path: str = "THIS_FILE") -> str:
    """How to launch an exported task by hand: a spot task only as a managed job, which recovers from
    preemption (a plain `sky launch` of it would be an unmanaged spot cluster)."""
    launch = "sky jobs launch" if cfg["resources"].get("use_spot") else "sky launch"
    flags = "".join(f" --secret {n}" for n in (cfg.get("secrets") or {}))
    return f"{launch} {path}{flags}"


def to_yaml(cfg: dict) -> str:
    header = f"# Generated by gpt2cloud. Launch with\n#   {sky_command(cfg)}\n"
    if cfg.get("secrets"):
        header += "# Secrets are left empty on purpose: each --secret NAME takes its value from your environment.\n"
    return header + yaml.dump(redact(cfg), Dumper=_Dumper, sort_keys=False, width=1000)


def storage_settings(urls: list[str], env: Optional[dict] = None) -> tuple[dict, dict]:
    """(plain envs, secrets) the node needs to reach these storage URLs, from this environment.

    S3: credentials from the environment or boto3's chain (profile, ~/.aws), endpoint and region as
    plain envs. hf://: HF_TOKEN when set (a public repo needs none), HF_ENDPOINT as a plain env.
    file:// needs nothing (and only works with --infra local).
    """
    env = os.environ if env is None else env
    plain, secrets = {}, {}
    for scheme, plain_names, secret_names in (("hf://", HUB_PLAIN_ENVS, HUB_SECRET_NAMES),
                                              ("s3://", S3_PLAIN_ENVS, S3_SECRET_NAMES)):
        if any(u.startswith(scheme) for u in urls):
            plain.update((k, env[k]) for k in plain_names if env.get(k))
            secrets.update((k, env[k]) for k in secret_names if env.get(k))
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
