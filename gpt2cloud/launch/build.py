"""Ship this exact version of the trainer to a node: a pure-Python wheel of `model` and `gpt2cloud.store`.

Built from the modules this process imports (editable checkout or installed package alike), with no
build backend and no network, byte-for-byte reproducible (sorted entries, fixed timestamps). It holds
only what the node runs: `model/` and the store package it imports (an import-linter contract keeps it
so), so skypilot, typer and pydantic never land on a GPU node. The node installs it with `--no-deps`.

write_workdir() puts the wheel, the trainer's config.json and the task as launched (task.yaml) into
the workdir SkyPilot ships: the only files a launch writes on this machine besides the run registry.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import io
import zipfile
from pathlib import Path

import gpt2cloud
from gpt2cloud.names import NODE_EXTRAS_ENV  # noqa: F401  (build.NODE_EXTRAS_ENV: the launch names it)
from gpt2cloud.store import STORES, atomic_write
from gpt2cloud.store.layout import CONFIG
from model.trackers import TRACKERS

NAME = "gpt2cloud"
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".tmp")
# What the node needs besides the wheel and torch (skypilot is deliberately absent): the node's setup
# (gpt2cloud/launch/task.py) installs exactly these.
# The trainer's own, then each store's client library (boto3 for s3://, huggingface_hub for --data hf://).
NODE_REQUIREMENTS = ("numpy", "tiktoken", "safetensors") + tuple(
    dict.fromkeys(r for scheme in STORES.values() for r in scheme.node_requirements))
# Only when a run asks for them: its trackers' packages (model/trackers.py TRACKERS), named in the plain env
# NODE_EXTRAS_ENV of the task (space-separated), which the node's setup installs beside NODE_REQUIREMENTS.


def tracker_requirements(names) -> tuple:
    """The pip requirements of these trackers, each once, in order (none for a tracker that needs none)."""
    return tuple(dict.fromkeys(TRACKERS[n].requirement for n in names if TRACKERS[n].requirement))


def files_of(package: str, arc_prefix: str) -> list[tuple[str, bytes]]:
    """(name in the wheel, content) of every source file of an installed package."""
    root = Path(str(importlib.resources.files(package)))
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part in SKIP_DIRS for part in rel.parts) or p.name.endswith(SKIP_SUFFIXES):
            continue
        out.append((f"{arc_prefix}/{rel.as_posix()}", p.read_bytes()))
    return out


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def pack_wheel(files: list[tuple[str, bytes]], requires: tuple, summary: str) -> tuple[str, bytes]:
    """(file name, content) of a pure-Python wheel of these files, built in memory: reproducible (fixed
    timestamps), no build backend, no network."""
    version = gpt2cloud.__version__
    dist_info = f"{NAME}-{version}.dist-info"
    metadata = (
        "Metadata-Version: 2.1\n"
        f"Name: {NAME}\nVersion: {version}\n"
        f"Summary: {summary}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires)
    ).encode()
    wheel = b"Wheel-Version: 1.0\nGenerator: gpt2cloud\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files = files + [
        (f"{dist_info}/METADATA", metadata),
        (f"{dist_info}/WHEEL", wheel),
        (f"{dist_info}/top_level.txt", b"gpt2cloud\nmodel\n"),
    ]
    record_name = f"{dist_info}/RECORD"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files) + f"{record_name},,\n"
    files.append((record_name, record.encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return f"{NAME}-{version}-py3-none-any.whl", buf.getvalue()


def wheel_bytes() -> tuple[str, bytes]:
    """(file name, wheel content) of the node's trainer: model/ and gpt2cloud's store, from the code this
    process runs."""
    files = [("gpt2cloud/__init__.py", Path(gpt2cloud.__file__).read_bytes())]
    files += files_of("gpt2cloud.store", "gpt2cloud/store") + files_of("model", "model")
    return pack_wheel(files, ("torch", *NODE_REQUIREMENTS), "gpt2cloud trainer, shipped to a node by `gpt2cloud launch`")


def write_workdir(workdir: str | Path, wheel: tuple[str, bytes], train_config_json: str | None, task_yaml: str) -> None:
    """The node's workdir: this build's wheel (older ones removed), config.json (a training run's) and task.yaml."""
    dest = Path(workdir)
    dest.mkdir(parents=True, exist_ok=True)
    name, data = wheel
    for old in dest.glob(f"{NAME}-*.whl"):
        old.unlink()
    atomic_write(dest / name, data)
    if train_config_json is not None:
        atomic_write(dest / CONFIG, train_config_json)
    atomic_write(dest / "task.yaml", task_yaml)
