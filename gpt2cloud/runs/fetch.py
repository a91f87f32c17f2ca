"""`gpt2cloud fetch`: checkpoints, metrics and logs from a run's bucket, every sha256 verified.

A fetched directory carries its run's identity in FETCH_MARKER (written before the first download):
fetching the same run into it again resumes or is a no-op; any other run's, or a directory of files
fetch did not write, is refused before anything is written (docs/ownership.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from gpt2cloud.errors import UserError
from gpt2cloud.runs import registry
from gpt2cloud.store import StorageError, atomic_write, open_store
from gpt2cloud.store.layout import CHECKPOINTS, LOGS, METRICS, RUN_JSON, TENSORBOARD, TIMELINE, remote_checkpoints
from gpt2cloud.store.transfer import download_dir

FETCH_MARKER = "gpt2cloud_fetch.json"  # {"run": run id, "url": the run's bucket URL}
# what fetch writes into --dest, and what a plot or report of the run adds there
FETCHED = {FETCH_MARKER, CHECKPOINTS, METRICS, TIMELINE, RUN_JSON, LOGS, TENSORBOARD, "plot.png", "report.md"}


def _resolve(run_or_url: str) -> tuple[str, str]:
    """(run id, run URL) from a registry run id or a bucket URL of a run (<bucket>/<run id>)."""
    if "://" in run_or_url:
        url = run_or_url.rstrip("/")
        return url.rsplit("/", 1)[-1] or "run", url
    record = registry.get(run_or_url)
    return record.run_id, record.spec.run_url.rstrip("/")


def read_marker(dest: Path) -> Optional[dict]:
    """The run a directory was fetched for ({"run", "url"}), or None."""
    try:
        marker = json.loads((dest / FETCH_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _run_json_id(dest: Path) -> Optional[str]:
    try:
        return json.loads((dest / RUN_JSON).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def check_dest(dest: Path, run_id: str, url: str) -> None:
    """--dest is new, empty, or this run's earlier fetch; else one line naming what is there."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--dest {dest}: is a file; give a directory (new or empty, or where this run was "
                        f"fetched before), e.g. --dest runs/{run_id}")
    names = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
    if not names:
        return
    ways = f"fetch into a new or empty --dest (e.g. runs/{run_id})"
    marker = read_marker(dest)
    if marker is not None:
        if str(marker.get("url", "")).rstrip("/") == url:
            return  # the same run: a resume, or a no-op
        raise UserError(f"--dest {dest}: holds run {marker.get('run')} fetched from {marker.get('url')}, not "
                        f"{run_id}; {ways}")
    foreign = [n for n in names if n not in FETCHED]
    other = _run_json_id(dest)
    if not foreign and other == run_id:
        return  # fetched by an older gpt2cloud (no marker yet): its run.json names this run
    if other and other != run_id:
        raise UserError(f"--dest {dest}: holds run {other} (its {RUN_JSON}), not {run_id}; {ways}")
    what = ", ".join(foreign[:3] or names[:3]) + (", ..." if len(foreign or names) > 3 else "")
    raise UserError(f"--dest {dest}: holds files fetch did not write for run {run_id} ({what}); {ways}")


def _remember(run_id: str, url: str, dest: Path) -> None:
    """Note in the run's registry record where its OUT now is (plot and report look there first).

    A bucket URL counts when it is the URL of a run in the registry; anything else has no record."""
    record = registry.find(run_id)  # read again: the record may have changed while we downloaded
    if record is None or record.spec.run_url.rstrip("/") != url:
        return
    record.fetched_dir = str(dest.resolve())
    registry.save(record)


def fetch(run_or_url: str, dest: Optional[Path] = None, step: Optional[int] = None, all_: bool = False,
          logs: bool = False, progress: bool = True) -> dict:
    run_id, url = _resolve(run_or_url)
    dest = Path(dest) if dest else Path("runs") / run_id
    check_dest(dest, run_id, url)
    store = open_store(url)
    complete, _ = remote_checkpoints(store)
    has_metrics = store.exists(METRICS)
    if not complete and not has_metrics and not store.exists(RUN_JSON):
        raise UserError(f"nothing to fetch at {url}: no checkpoints, metrics or run.json there; check the run id "
                        "or URL (`gpt2cloud runs`), or wait until the node has pushed its first files")
    if step is not None:
        chosen = [c for c in complete if c[0] == step]
        if not chosen:
            have = ", ".join(str(s) for s, _ in complete) or "none yet"
            raise UserError(f"--step {step}: no complete checkpoint of step {step} in {url} (complete: {have})")
    elif all_:
        chosen = complete
    else:
        chosen = complete[-1:]
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--dest {dest}: cannot be created ({e.strerror}); give another directory") from None
    if read_marker(dest) is None:  # first, so an interrupted fetch is still known as this run's
        atomic_write(dest / FETCH_MARKER, json.dumps({"run": run_id, "url": url}) + "\n")
    fetched = []
    for s, name in chosen:
        try:
            got = download_dir(store, f"{CHECKPOINTS}/{name}", dest / CHECKPOINTS / name, progress=progress)
        except StorageError as e:
            raise UserError(f"checkpoint {name} of {url}: {e}; rerun to resume, or pick another with --step") \
                from None
        fetched.append({"step": s, "path": str(dest / CHECKPOINTS / name), "files": got["files"],
                        "downloaded": got["downloaded"], "skipped": got["skipped"], "bytes": got["bytes"]})
    out = {"run": run_id, "url": url, "dest": str(dest), "checkpoint": fetched[-1]["path"] if fetched else None,
           "checkpoints": fetched, "available_steps": [s for s, _ in complete], "metrics": None, "logs": []}
    if has_metrics:
        store.get_file(METRICS, dest / METRICS)
        out["metrics"] = str(dest / METRICS)
    if store.exists(TIMELINE):  # the node's phases, for report's estimate-vs-actual per phase
        store.get_file(TIMELINE, dest / TIMELINE)
    if store.exists(RUN_JSON):  # the run's GPUs and price, for plot and report on a DIR fetched elsewhere
        store.get_file(RUN_JSON, dest / RUN_JSON)
    for obj in store.list(f"{TENSORBOARD}/"):  # --tracker tensorboard: `tensorboard --logdir DEST/tensorboard`
        store.get_file(obj.key, dest / obj.key)
    if logs:
        for obj in store.list(f"{LOGS}/"):
            store.get_file(obj.key, dest / obj.key)
            out["logs"].append(str(dest / obj.key))
    _remember(run_id, url, dest)
    return out
