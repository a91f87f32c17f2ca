"""The bundled hardware tables: GPU specs, default prices and the MFU calibration points."""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from gpt2cloud.errors import UserError
from gpt2cloud.home import user_calibration_path


MAX_GPUS_PER_NODE = 64


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_bf16_tflops: float
    memory_gib: float
    note: str = ""


@dataclass(frozen=True)
class Calibration:
    mfu: float
    source: str  # where the figure comes from, printed next to every estimate


@functools.lru_cache(maxsize=None)
def table(name: str) -> dict:
    return yaml.safe_load((importlib.resources.files("gpt2cloud.cost.tables") / f"{name}.yaml").read_text())


def known_gpus() -> list[str]:
    return list(table("gpus"))


def gpu_spec(name: str) -> GpuSpec:
    gpus = table("gpus")
    canonical = {k.lower(): k for k in gpus}.get(name.lower())
    if canonical is None:
        raise UserError(f"unknown GPU '{name}'; known GPUs: {', '.join(gpus)}")
    return GpuSpec(name=canonical, **gpus[canonical])


def gpu_from_device_name(device_name: str, memory_gib: float) -> str | None:
    """Our table's name for a CUDA device ('NVIDIA H100 80GB HBM3' -> H100), or None.

    Plain chip names only (H100-MEGA is a cloud's networking variant, not a device), longest first so
    that GH200 wins over H200, and A100 told apart by its memory."""
    words = device_name.upper().replace("-", " ").split()
    for gpu in sorted((g for g in table("gpus") if "-" not in g and g != "CPU"), key=len, reverse=True):
        if gpu.upper() in words:
            return "A100-80GB" if gpu == "A100" and memory_gib > 60 else gpu
    return None


def parse_gpus(text: str) -> tuple[str, int]:
    """'H100:8' -> ('H100', 8); a bare 'H100' means one GPU, as in SkyPilot."""
    name, colon, count = text.partition(":")
    if not name or (colon and not count):
        raise UserError(f"--gpus '{text}': expected TYPE:COUNT such as H100:8 (a bare TYPE means one GPU)")
    if count == "":
        n = 1
    else:
        try:
            n = int(count)
        except ValueError:
            raise UserError(f"--gpus '{text}': the count '{count}' is not a whole number; use e.g. H100:8") from None
        if not 1 <= n <= MAX_GPUS_PER_NODE:
            raise UserError(f"--gpus '{text}': the GPU count must be 1 to {MAX_GPUS_PER_NODE}; use e.g. {name}:8")
    return gpu_spec(name).name, n


def user_points() -> list[dict]:
    """What this user's finished runs measured (`gpt2cloud report` appends them): MFU points and phase
    durations. A damaged line is skipped with a warning, never fatal: a bad file must not break every
    estimate."""
    path = user_calibration_path()
    try:
        stamp = path.stat().st_mtime_ns if path.is_file() else None
    except OSError:
        stamp = None
    return list(_read_points(str(path), stamp)) if stamp is not None else []


@functools.lru_cache(maxsize=4)
def _read_points(path: str, stamp: int) -> tuple:
    """The file's points, read (and warned about) once per version of it."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        print(f"warning: {path}: cannot be read ({e.strerror}); ignored", file=sys.stderr)
        return ()
    points, bad = [], 0
    for line in lines:
        try:
            point = json.loads(line)
        except json.JSONDecodeError:
            point = None
        if isinstance(point, dict):
            points.append(point)
        elif line.strip():
            bad += 1
    if bad:
        print(f"warning: {path}: {bad} damaged line(s) skipped; delete them or the file", file=sys.stderr)
    return tuple(points)


def calibration_points() -> list[dict]:
    """MFU points: the bundled table's, then this user's measured ones. Single-node runs only: a multi-node
    run's step also waits for the network (gpt2cloud/runs/calibrate.py records it as a network point)."""
    measured = [p for p in user_points() if isinstance(p.get("gpu"), str) and isinstance(p.get("params"), int)
                and isinstance(p.get("mfu"), (int, float)) and p.get("nodes", 1) == 1]
    return list(table("calibration")["points"]) + measured


def default_mfu(gpu: str, params: int) -> Calibration:
    """MFU for a GPU and model size: interpolated in log(params) between calibration points."""
    points = calibration_points()
    own = [p for p in points if p["gpu"] == gpu]
    borrowed = ""
    if not own:
        fallback = table("calibration")["fallback_gpu"]
        own = [p for p in points if p["gpu"] == fallback]
        borrowed = f"no calibration for {gpu}; using {fallback}'s: "
    own.sort(key=lambda p: p["params"])
    below = [p for p in own if p["params"] <= params]
    above = [p for p in own if p["params"] >= params]
    lo = below[-1] if below else above[0]
    hi = above[0] if above else below[-1]
    if lo["params"] == hi["params"]:
        return Calibration(lo["mfu"], borrowed + f"{lo['source']} ({lo['date']})")
    w = (math.log(params) - math.log(lo["params"])) / (math.log(hi["params"]) - math.log(lo["params"]))
    mfu = lo["mfu"] + w * (hi["mfu"] - lo["mfu"])
    return Calibration(
        round(mfu, 4),
        borrowed + f"interpolated between {lo['source']} ({lo['date']}) and {hi['source']} ({hi['date']})",
    )


def parse_gpu_candidates(text: str) -> tuple[tuple[str, int], ...]:
    """'H100:8,A100-80GB:8' -> (('H100', 8), ('A100-80GB', 8)): SkyPilot's candidate list, the node any one
    of them. Every candidate has the same count: the batch splits over the ranks the same way on each, so
    one config.json (micro-batch, gradient accumulation) serves whichever the launch lands on."""
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise UserError(f"--gpus '{text}': an empty candidate; expected TYPE:COUNT[,TYPE:COUNT...] such as "
                        "H100:8,A100-80GB:8")
    found = tuple(parse_gpus(p) for p in parts)
    names = [name for name, _ in found]
    if len(set(names)) != len(names):
        raise UserError(f"--gpus '{text}': a GPU type is listed twice; list each once, e.g. H100:8,A100-80GB:8")
    if len({n for _, n in found}) > 1:
        raise UserError(f"--gpus '{text}': every candidate needs the same GPU count per node (the batch splits "
                        f"over the ranks alike on each); use e.g. {names[0]}:{found[0][1]},{names[1]}:{found[0][1]}")
    return found
