"""The run registry: one JSON file per run under `$GPT2CLOUD_HOME/runs/` (default ~/.gpt2cloud/runs/).

A run's identity is its RunSpec, frozen at launch and serialized once (the registry and the bucket's
run.json hold the same dict). A RunRecord adds what happened to it here: where it lives (its backend's
handle: SkyPilot cluster, managed job or local process), its launches and the state we last set.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from gpt2cloud import home
from gpt2cloud.backends import handle_from_dict
from gpt2cloud.cost.estimate import Estimate
from gpt2cloud.errors import UserError
from gpt2cloud.names import CLUSTER, LAUNCHING, LOCAL, MANAGED_JOB, UNKNOWN
from gpt2cloud.store import atomic_write
from gpt2cloud.store.base import tmp_path

# SkyPilot cluster names: lowercase letters, digits and dashes, starting with a letter.
RUN_ID_RE = re.compile(r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$")
SPEC_FORMAT = "gpt2cloud-run"
SPEC_VERSION = 1

# How long a registry write waits for another gpt2cloud process writing the same record: writes take
# milliseconds, so a lock held longer belongs to a process that hangs; every wait is bounded.
LOCK_WAIT_S = 10.0

# Records written before backends kept handles had their fields at the top level; from_dict moves them
# into the handle (its backend keeps those it has)
FLAT_HANDLE_FIELDS = ("cluster", "job_id", "request_id", "pid", "local_dir")


@dataclass(frozen=True)
class RunSpec:
    """What a run is, fixed at launch: written once to the bucket's run.json and kept in the registry.

    Never holds a secret: credentials travel to the node as SkyPilot secrets and are not written anywhere.
    """

    run_id: str
    kind: str  # LOCAL, CLUSTER (on-demand SkyPilot cluster) or MANAGED_JOB (spot, recovered)
    infra: str  # lambda, aws, ..., ANY (any_of over enabled clouds) or LOCAL
    run_url: str  # where the node syncs OUT: <bucket>/<run_id>
    bucket: str
    data_url: str
    recipe: str
    gpu_type: str
    gpus_per_node: int
    nodes: int
    spot: bool
    price_per_gpu_hour: float  # the launch's one price (an any_of launch: its most expensive candidate's)
    total_steps: int
    estimate: Optional[Estimate]  # made for exactly this launch
    max_cost_usd: float = 0.0
    max_hours: float = 0.0  # 0: no wall-time limit
    idle_minutes: int = 0
    build_sha256: str = ""  # the wheel shipped to the node: this exact version of the trainer
    # an any_of launch over several clouds: each candidate's USD per GPU-hour; the node caps at its own
    # cloud's (config.json carries these, model/config.py price_here picks)
    cloud_prices: dict = field(default_factory=dict)
    retry_minutes: float = 0.0  # --retry-until-up: how long the backend lets SkyPilot wait for capacity (0: no retry)
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
    # where the run lives, kept by its backend (a dataclass of the backend's module: SkyHandle, LocalHandle,
    # ...); None before the backend started it, and in a record rebuilt from what exists
    handle: Any = None
    fetched_dir: Optional[str] = None  # where `gpt2cloud fetch` last put the run's OUT (absolute path)
    state: str = LAUNCHING  # last state we set ourselves (LAUNCHING, LAUNCHED, DOWN, ...: gpt2cloud/names.py)
    launches: int = 1  # how many times this run id was launched (resumes count)
    history: list = field(default_factory=list)  # [{"at", "event"}] launch/down events
    owner: str = ""  # the launch that wrote this record (a random id): only it updates the record
    # not saved: set when the record was rebuilt from what exists because the registry's file is
    # missing or damaged (see recover()); says so, and `down` then writes no record
    recovered: str = field(default="", compare=False)

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def node_dir(self) -> Path:
        """A local run's node directory: where it was started (its handle's local_dir), else where it
        would be now."""
        local_dir = getattr(self.handle, "local_dir", None)
        return Path(local_dir) if local_dir else home.local_node_dir(self.run_id)

    def to_dict(self) -> dict:
        d = asdict(self)  # the handle too: a dict under "handle" (or None)
        d["spec"] = self.spec.to_dict()
        d.pop("recovered")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        """From to_dict()'s JSON, or a record of the version before handles (flat fields); ValueError,
        TypeError or KeyError for anything else."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known and k not in ("recovered", "handle")}
        values["spec"] = spec = RunSpec.from_dict(d["spec"])
        handle = d.get("handle")
        if handle is None:  # written before handles: the backend's fields stood at the top level
            handle = {k: d[k] for k in FLAT_HANDLE_FIELDS if d.get(k) is not None} or None
        values["handle"] = handle_from_dict(spec.kind, handle) if handle is not None else None
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


class RunTaken(UserError):
    """Another launch owns this run's record (it was created, or relaunched, by another process)."""


def new_owner() -> str:
    return uuid.uuid4().hex


@contextmanager
def _locked(run_id: str):
    """An exclusive lock on one run's record (runs/.RUN.lock) among gpt2cloud processes: a compare and
    the replace after it are one step. Bounded: UserError after LOCK_WAIT_S."""
    lock = home.runs_dir() / f".{check_run_id(run_id)}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        home.lock_exclusive(fd, LOCK_WAIT_S, f"{lock}: another gpt2cloud process holds the record of run "
                                             f"'{run_id}' for over {LOCK_WAIT_S:g} s; retry when it is done")
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _text(record: RunRecord) -> str:
    return json.dumps(record.to_dict(), indent=2, default=str) + "\n"


def _create(path: Path, text: str) -> bool:
    """Write path only if it does not exist (link a complete temporary file to it: readers never see a
    torn record, and of two creators exactly one wins). False if it existed."""
    tmp = tmp_path(path)
    try:
        atomic_write(tmp, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _current_owner(path: Path) -> Optional[str]:
    """The owner of the record at path ("" for one written before owners existed); None if there is none.
    UserError for a damaged file: it is left as it is, never written over."""
    try:
        return str(json.loads(path.read_text()).get("owner") or "")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: not a readable run record ({type(e).__name__}); it is left as it is: move it "
                        "aside (or delete it if the run is gone) and retry") from None


def claim(record: RunRecord, old: Optional[RunRecord]) -> Path:
    """Make record the run's record for a new launch: create it if there was none (`old` None), else
    replace `old` only if the file still holds it (compare-and-set on the owner). RunTaken when
    another launch got there first: then nothing is written."""
    path = path_for(record.run_id)
    check_writable(path.parent)
    record.owner = new_owner()
    taken = RunTaken(f"run '{record.run_id}' was just launched by another gpt2cloud process; its record was "
                     f"left as it is: watch it with `gpt2cloud status {record.run_id}`, or pick another --name")
    if old is None:
        if not _create(path, _text(record)):
            raise taken
        return path
    with _locked(record.run_id):
        if _current_owner(path) != old.owner:
            raise taken
        atomic_write(path, _text(record))
    return path


def save(record: RunRecord) -> Path:
    """Update the run's record, atomically, if this record's launch still owns it (RunTaken if another
    launch took it over; UserError if the file is damaged: it is never written over)."""
    path = path_for(record.run_id)
    check_writable(path.parent)
    if _create(path, _text(record)):  # a new record (a prepare job's), or one deleted meanwhile
        return path
    with _locked(record.run_id):
        owner = _current_owner(path)
        if owner is not None and owner != record.owner:
            raise RunTaken(f"{path}: run '{record.run_id}' was relaunched by another gpt2cloud process; this "
                           "one leaves its record as it is")
        atomic_write(path, _text(record))
    return path


def check_writable(runs: Path) -> None:
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise home.unusable(e) from None


def find(run_id: str) -> Optional[RunRecord]:
    if not RUN_ID_RE.match(run_id or ""):
        return None
    path = home.runs_dir() / f"{run_id}.json"
    if not path.is_file():
        return None
    try:
        return RunRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"{path}: not a readable run record ({type(e).__name__}); move it aside, or delete it "
                        "if the run is gone") from None


def get(run_id: str) -> RunRecord:
    """The run's record; if its file is missing or damaged, the run rebuilt from what exists (recover()),
    with `recovered` saying so; UserError when there is nothing of it at all."""
    try:
        record = find(run_id)
    except UserError as damaged:
        record = recover(run_id, f"its record {path_for(run_id)} is damaged (left as it is)")
        if record is None:
            raise damaged from None
        return record
    if record is None:
        record = recover(run_id, f"its record {home.runs_dir() / (run_id + '.json')} is missing")
    if record is None:
        known = [r.run_id for r in all_runs()]
        hint = f"known runs: {', '.join(known[-5:])}" if known else "no runs yet; start one with `gpt2cloud launch`"
        raise UserError(f"unknown run '{run_id}' (not in {home.runs_dir()}); see `gpt2cloud runs` ({hint})")
    return record


# ---- a run whose record is missing or damaged, rebuilt from what exists
#
# A launch leaves three traces besides its record: the node's workdir (builds/RUN/task.yaml, with the
# run's bucket URL and whether it is a spot job), the bucket's run.json (the full spec), and for a local
# run its node directory (local/RUN/, with the driver's PID). From those, `down` and `status` act on and
# report the run; SkyPilot's cluster or managed job is then found by name through the backend.

def _task_envs(run_id: str) -> tuple[dict, bool]:
    """(the task's envs, spot?) from the build's task.yaml (or the local node's copy); ({}, False) if none."""
    import yaml

    for d in (home.build_dir(run_id), home.local_node_dir(run_id) / "sky_workdir"):
        try:
            cfg = yaml.safe_load((d / "task.yaml").read_text())
            return dict(cfg.get("envs") or {}), bool((cfg.get("resources") or {}).get("use_spot"))
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
    return {}, False


DEFAULT_PUSH_EVERY_S = 60.0  # launch --push-every's default, for a run whose task file is not here


def push_every(run_id: str) -> float:
    """The run's push interval in seconds (launch --push-every), from its task as launched; the default when
    the task file is gone or names none (`down --graceful`'s wait, a spot run's unseen attempts)."""
    envs, _spot = _task_envs(run_id)
    try:
        return float(envs.get("GPT2CLOUD_PUSH_EVERY") or DEFAULT_PUSH_EVERY_S)
    except (TypeError, ValueError):
        return DEFAULT_PUSH_EVERY_S


def _bucket_spec(run_url: str) -> Optional[RunSpec]:
    from gpt2cloud.store import StorageError, open_store
    from gpt2cloud.store.layout import RUN_JSON

    try:
        return RunSpec.from_dict(json.loads(open_store(run_url).get_bytes(RUN_JSON)))
    except (StorageError, ValueError, KeyError, TypeError, AttributeError):  # gone, or of another shape
        return None


def recover(run_id: str, problem: str) -> Optional[RunRecord]:
    """The run rebuilt from its build, its bucket's run.json and its local node; None if none exists."""
    if not RUN_ID_RE.match(run_id or ""):
        return None
    envs, spot = _task_envs(run_id)
    node = home.local_node_dir(run_id)
    is_local = (node / "driver.pid").is_file()
    if not envs and not is_local:
        return None
    run_url = str(envs.get("GPT2CLOUD_RUN_URL") or "")
    spec = _bucket_spec(run_url) if run_url else None
    found = ["the bucket's run.json"] if spec is not None and spec.run_id == run_id else []
    if not found:  # what the build names, and placeholders: enough to find, stop and report the run
        gpus = str(envs.get("GPT2CLOUD_GPUS_PER_NODE") or "0")
        kind = LOCAL if is_local else MANAGED_JOB if spot else CLUSTER
        spec = RunSpec(run_id=run_id, kind=kind, infra=LOCAL if is_local else "?", run_url=run_url,
                       bucket=str(envs.get("GPT2CLOUD_BUCKET") or ""),
                       data_url=str(envs.get("GPT2CLOUD_DATA_URL") or ""),
                       recipe=str(envs.get("GPT2CLOUD_RECIPE") or "?"), gpu_type="?",
                       gpus_per_node=int(gpus) if gpus.isdigit() else 0, nodes=1, spot=spot,
                       price_per_gpu_hour=0.0, total_steps=0, estimate=None)
    found += ["its build"] if envs else []
    found += ["its local node"] if is_local else []
    if not spec.local:
        found.append("SkyPilot (by the name)")
    # No handle: each backend finds a run without one by its name (the cluster's and the managed job's
    # name, the node directory under $GPT2CLOUD_HOME/local/)
    return RunRecord(spec=spec, started_at=node.stat().st_mtime if node.exists() else 0.0,
                     state=UNKNOWN, recovered=f"{problem}; found the run from {', '.join(found)}")


def all_runs() -> list[RunRecord]:
    d = home.runs_dir()
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        try:
            out.append(RunRecord.from_dict(json.loads(p.read_text())))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            # a damaged or foreign file: named, and skipped rather than breaking `runs` and `status`
            print(f"warning: {p}: not a readable run record ({type(e).__name__}); skipped", file=sys.stderr)
    return sorted(out, key=lambda r: r.started_at)


def note(record: RunRecord, event: str, state: Optional[str] = None) -> None:
    """Append an event to the run's history (and optionally set its state), then save (not a record
    rebuilt by recover(): the registry's file is missing or damaged, and a damaged one stays as it is)."""
    record.history.append({"at": time.time(), "event": event})
    if state:
        record.state = state
    if not record.recovered:
        save(record)
