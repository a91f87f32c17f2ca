"""`gpt2cloud fetch`: checkpoints, metrics and logs from a run's bucket, every sha256 verified."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from gpt2cloud.errors import UserError
from gpt2cloud.runs import registry
from gpt2cloud.store import StorageError, open_store
from gpt2cloud.store.layout import CHECKPOINTS, LOGS, METRICS, RUN_JSON, TIMELINE, remote_checkpoints
from gpt2cloud.store.transfer import download_dir


def _resolve(run_or_url: str) -> tuple[str, str]:
    """(run id, run URL) from a registry run id or a bucket URL of a run (<bucket>/<run id>)."""
    if "://" in run_or_url:
        url = run_or_url.rstrip("/")
        return url.rsplit("/", 1)[-1] or "run", url
    record = registry.get(run_or_url)
    return record.run_id, record.spec.run_url


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
    dest.mkdir(parents=True, exist_ok=True)
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
    if logs:
        for obj in store.list(f"{LOGS}/"):
            store.get_file(obj.key, dest / obj.key)
            out["logs"].append(str(dest / obj.key))
    _remember(run_id, url, dest)
    return out
