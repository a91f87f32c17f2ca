"""The run registry: one JSON file per run under `$GPT2CLOUD_HOME/runs/` (default ~/.gpt2cloud/runs/).

A run's identity is its RunSpec, frozen at launch and serialized once (the registry and the bucket's
run.json hold the same dict). A RunRecord adds what happened to it here: where it lives (SkyPilot
cluster, managed job or local process), its launches and the state we last set.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from gpt2cloud import home
from gpt2cloud.cost.estimate import Estimate
from gpt2cloud.errors import UserError
from gpt2cloud.store import atomic_write

# SkyPilot cluster names: lowercase letters, digits and dashes, starting with a letter.
RUN_ID_RE = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
SPEC_FORMAT = "gpt2cloud-run"
SPEC_VERSION = 1

# The kinds of run, each served by one backend (gpt2cloud/backends/).
LOCAL, CLUSTER, MANAGED_JOB = "local", "cluster", "managed-job"


@dataclass(frozen=True)
class RunSpec:
    """What a run is, fixed at launch: written once to the bucket's run.json and kept in the registry.

    Never holds a secret: credentials travel to the node as SkyPilot secrets and are not written anywhere.
    """

    run_id: str
    kind: str  # LOCAL, CLUSTER (on-demand SkyPilot cluster) or MANAGED_JOB (spot, recovered)
    infra: str  # lambda, aws, ..., "any" (any_of over enabled clouds) or "local"
    run_url: str  # where the node syncs OUT: <bucket>/<run_id>
    bucket: str
    data_url: str
    recipe: str
    gpu_type: str
    gpus_per_node: int
    nodes: int
    spot: bool
    price_per_gpu_hour: float
    total_steps: int
    estimate: Optional[Estimate]  # made for exactly this launch
    max_cost_usd: float = 0.0
    max_hours: float = 0.0  # 0: no wall-time limit
    idle_minutes: int = 0
    build_sha256: str = ""  # the wheel shipped to the node: this exact version of the trainer
    image: str = ""  # the node's image (SkyPilot image_id, e.g. docker:REPO:TAG with CUDA torch); "": the cloud's default

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def local(self) -> bool:
        """Run on this machine (CPU ranks or local GPUs), not on rented ones."""
        return self.kind == LOCAL

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        """From to_dict()'s JSON; ValueError for anything else (a foreign or damaged run.json)."""
        if not isinstance(d, dict) or d.get("format") != SPEC_FORMAT:
            raise ValueError("not a gpt2cloud run spec")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if values.get("estimate"):
            values["estimate"] = Estimate.from_dict(values["estimate"])
        try:
            return cls(**values)
        except TypeError as e:
            raise ValueError(f"incomplete run spec: {e}") from None


@dataclass
class RunRecord:
    """A run in the registry: its spec, plus what happened to it on this machine."""

    spec: RunSpec
    started_at: float  # unix time of the (latest) launch
    cluster: Optional[str] = None  # SkyPilot cluster name (kind CLUSTER)
    job_id: Optional[int] = None  # SkyPilot job id on the cluster, or the managed job id
    request_id: Optional[str] = None  # the SkyPilot launch request: `down` cancels it while LAUNCHING
    pid: Optional[int] = None  # local runs: the driver's PID (also its process group and session)
    local_dir: Optional[str] = None  # local runs: the node's directory (logs, OUT, data)
    fetched_dir: Optional[str] = None  # where `gpt2cloud fetch` last put the run's OUT (absolute path)
    state: str = "LAUNCHING"  # last state we set ourselves (LAUNCHING, LAUNCHED, DOWN, ...)
    launches: int = 1  # how many times this run id was launched (resumes count)
    history: list = field(default_factory=list)  # [{"at", "event"}] launch/down events

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def node_dir(self) -> Path:
        """A local run's node directory: where it was started (local_dir), else where it would be now."""
        return Path(self.local_dir) if self.local_dir else home.local_node_dir(self.run_id)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["spec"] = RunSpec.from_dict(d["spec"])
        return cls(**values)


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id or ""):
        raise UserError(
            f"run name '{run_id}' is not valid: use 1-40 lowercase letters, digits and dashes, "
            "starting with a letter (it becomes the SkyPilot cluster name), e.g. --name gpt2-124m-1"
        )
    return run_id


def new_run_id(recipe: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", recipe.lower()).strip("-") or "run"
    if not base[0].isalpha():
        base = "r-" + base
    return f"{base[:24].rstrip('-')}-{time.strftime('%m%d-%H%M%S')}"


def path_for(run_id: str) -> Path:
    return home.runs_dir() / f"{check_run_id(run_id)}.json"


def save(record: RunRecord) -> Path:
    path = path_for(record.run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record.to_dict(), indent=2, default=str) + "\n")
    return path


def find(run_id: str) -> Optional[RunRecord]:
    if not RUN_ID_RE.match(run_id or ""):
        return None
    path = home.runs_dir() / f"{run_id}.json"
    if not path.is_file():
        return None
    try:
        return RunRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: not a readable run record ({type(e).__name__}); move it aside, or delete it "
                        "if the run is gone") from None


def get(run_id: str) -> RunRecord:
    record = find(run_id)
    if record is None:
        known = [r.run_id for r in all_runs()]
        hint = f"known runs: {', '.join(known[-5:])}" if known else "no runs yet; start one with `gpt2cloud launch`"
        raise UserError(f"unknown run '{run_id}' (not in {home.runs_dir()}); see `gpt2cloud runs` ({hint})")
    return record


def all_runs() -> list[RunRecord]:
    d = home.runs_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        try:
            out.append(RunRecord.from_dict(json.loads(p.read_text())))
        except (OSError, ValueError, TypeError, KeyError) as e:
            # a damaged or foreign file: named, and skipped rather than breaking `runs` and `status`
            print(f"warning: {p}: not a readable run record ({type(e).__name__}); skipped", file=sys.stderr)
    return sorted(out, key=lambda r: r.started_at)


def note(record: RunRecord, event: str, state: Optional[str] = None) -> None:
    """Append an event to the run's history (and optionally set its state), then save."""
    record.history.append({"at": time.time(), "event": event})
    if state:
        record.state = state
    save(record)
