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
import os
from dataclasses import dataclass
from typing import Optional

import yaml

from gpt2cloud.runs.registry import RunSpec
from gpt2cloud.store.layout import CONFIG, LOGS
from model.sync import EXIT_BUCKET, EXIT_DATA  # the exit codes of the node's sync steps

ANY, LOCAL = "any", "local"  # infra: any_of over the enabled clouds, or this machine

NODE_HOME_DEFAULT = "$HOME/.gpt2cloud-node"
MASTER_PORT = 8008
JOB_RECOVERY = {"strategy": "EAGER_NEXT_REGION", "max_restarts_on_errors": 1}

# Storage credentials: passed as SkyPilot secrets, never as envs, never printed.
S3_SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Storage settings that are not secret and travel as plain envs.
S3_PLAIN_ENVS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")

SETUP_SCRIPT = r"""set -euo pipefail
# gpt2cloud node setup: the trainer's dependencies (never skypilot) and this exact build of the trainer.
NODE_HOME="${GPT2CLOUD_NODE_HOME:-@NODE_HOME_DEFAULT@}"
mkdir -p "$NODE_HOME"
if [ -n "${GPT2CLOUD_PYTHON:-}" ]; then
  PY="$GPT2CLOUD_PYTHON"  # --infra local: this machine's Python already has torch, numpy, tiktoken, boto3
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
  "$PY" -m pip install -q "$GPT2CLOUD_TORCH_SPEC" numpy tiktoken safetensors boto3
fi
rm -rf "$NODE_HOME/site"
"$PY" -m pip install -q --no-deps --no-index --target "$NODE_HOME/site" ./gpt2cloud-*.whl
echo "$PY" > "$NODE_HOME/python"
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
"$PY" -m model.sync pull "$GPT2CLOUD_RUN_URL" "$OUT" --rank "$RANK" || exit @EXIT_BUCKET@
exec > >(tee -a "$OUT/@LOGS@/node-$RANK.log") 2>&1
echo "gpt2cloud: run $GPT2CLOUD_RUN_ID, node $RANK of $SKYPILOT_NUM_NODES, $SKYPILOT_NUM_GPUS_PER_NODE GPUs"
"$PY" -m model.sync data "$GPT2CLOUD_DATA_URL" "$DATA" || exit @EXIT_DATA@
"$PY" -m model.sync push "$OUT" "$GPT2CLOUD_RUN_URL" --rank "$RANK" --every "$GPT2CLOUD_PUSH_EVERY" \
  --keep "$GPT2CLOUD_KEEP_CHECKPOINTS" &
PUSHER=$!
MASTER_ADDR="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"
"$PY" -m torch.distributed.run --nnodes="$SKYPILOT_NUM_NODES" --nproc_per_node="$SKYPILOT_NUM_GPUS_PER_NODE" \
  --node_rank="$RANK" --master_addr="$MASTER_ADDR" --master_port="${GPT2CLOUD_MASTER_PORT:-@MASTER_PORT@}" \
  -m model.train --config @CONFIG@ --data "$DATA" --out "$OUT" --resume auto &
TRAINER=$!
trap 'kill -TERM "$TRAINER" 2>/dev/null' TERM INT
wait "$TRAINER"; RC=$?
if kill -0 "$TRAINER" 2>/dev/null; then wait "$TRAINER"; RC=$?; fi
kill -TERM "$PUSHER" 2>/dev/null
wait "$PUSHER"
echo "gpt2cloud: trainer exited with code $RC"
exit "$RC"
"""


def render(script: str) -> str:
    """A node script with its @NAME@ placeholders filled from the constants."""
    values = {"NODE_HOME_DEFAULT": NODE_HOME_DEFAULT, "MASTER_PORT": MASTER_PORT, "EXIT_DATA": EXIT_DATA,
              "EXIT_BUCKET": EXIT_BUCKET, "LOGS": LOGS, "CONFIG": CONFIG}
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


def resources(spec: RunSpec, node: NodeOptions) -> dict:
    res: dict = {"accelerators": f"{spec.gpu_type}:{spec.gpus_per_node}"}
    if spec.spot:
        # A managed job: the controller relaunches a preempted node, which resumes from the bucket.
        res["use_spot"] = True
        res["job_recovery"] = dict(JOB_RECOVERY)
    else:
        # Nothing keeps billing after the run: stop watching for jobs after idle_minutes, then tear down.
        res["autostop"] = {"idle_minutes": spec.idle_minutes, "down": True}
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
    }
    if spec.max_cost_usd:  # informational: the cap itself is in config.json, enforced by the trainer
        e["GPT2CLOUD_MAX_COST_USD"] = f"{spec.max_cost_usd:g}"
    for k, v in sorted(node.plain_envs):
        if k in S3_SECRET_NAMES:
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


def to_yaml(cfg: dict) -> str:
    header = ""
    names = list((cfg.get("secrets") or {}).keys())
    if names:
        flags = " ".join(f"--secret {n}" for n in names)
        header = (f"# Generated by gpt2cloud. Secrets are left empty on purpose: launch with\n"
                  f"#   sky launch THIS_FILE {flags}\n"
                  f"# (each --secret NAME takes its value from your environment).\n")
    return header + yaml.dump(redact(cfg), Dumper=_Dumper, sort_keys=False, width=1000)


def storage_settings(urls: list[str], env: Optional[dict] = None) -> tuple[dict, dict]:
    """(plain envs, secrets) the node needs to reach these storage URLs, from this environment.

    S3: credentials from the environment or boto3's chain (profile, ~/.aws), endpoint and region as
    plain envs. file:// needs nothing (and only works with --infra local).
    """
    env = os.environ if env is None else env
    plain, secrets = {}, {}
    if any(u.startswith("s3://") for u in urls):
        for k in S3_PLAIN_ENVS:
            if env.get(k):
                plain[k] = env[k]
        for k in S3_SECRET_NAMES:
            if env.get(k):
                secrets[k] = env[k]
        if "AWS_ACCESS_KEY_ID" not in secrets:
            try:
                import boto3

                creds = boto3.session.Session().get_credentials()
                frozen = creds.get_frozen_credentials() if creds else None
            except Exception:  # noqa: BLE001 - no boto3 or a broken profile: the node gets none
                frozen = None
            if frozen and frozen.access_key:
                secrets["AWS_ACCESS_KEY_ID"] = frozen.access_key
                secrets["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
                if frozen.token:
                    secrets["AWS_SESSION_TOKEN"] = frozen.token
    return plain, secrets

