"""`gpt2cloud fetch RUN|URL`: checkpoints, metrics and logs from a run's bucket, every sha256 verified."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _resolve(run_or_url: str) -> tuple[str, str]:
    """(run id, run URL) from a registry run id or a bucket URL of a run (<bucket>/<run id>)."""
    from gpt2cloud import registry

    if "://" in run_or_url:
        url = run_or_url.rstrip("/")
        return url.rsplit("/", 1)[-1] or "run", url
    record = registry.get(run_or_url)
    return record.run_id, record.run_url


def _remember(run_id: str, url: str, dest: Path) -> None:
    """Note in the run's registry record where its OUT now is (plot and report look there first).

    A bucket URL counts when it is the URL of a run in the registry; anything else has no record."""
    from gpt2cloud import registry

    record = registry.find(run_id)  # read again: the record may have changed while we downloaded
    if record is None or record.run_url.rstrip("/") != url:
        return
    record.fetched_dir = str(dest.resolve())
    registry.save(record)


def fetch(run_or_url: str, dest: Optional[Path] = None, step: Optional[int] = None, all_: bool = False,
          logs: bool = False, progress: bool = True) -> dict:
    from gpt2cloud.errors import UserError
    from gpt2cloud.storage import StorageError, open_store
    from gpt2cloud.transfer import download_dir
    from model.sync import CHECKPOINTS, METRICS, remote_checkpoints

    run_id, url = _resolve(run_or_url)
    dest = Path(dest) if dest else Path("runs") / run_id
    store = open_store(url)
    complete, _ = remote_checkpoints(store)
    has_metrics = store.exists(METRICS)
    if not complete and not has_metrics and not store.exists("run.json"):
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
    if store.exists("run.json"):  # the run's GPUs and price, for plot and report on a DIR fetched elsewhere
        store.get_file("run.json", dest / "run.json")
    if logs:
        for obj in store.list("logs/"):
            store.get_file(obj.key, dest / obj.key)
            out["logs"].append(str(dest / obj.key))
    _remember(run_id, url, dest)
    return out


def fetch_command(
    run: str = typer.Argument(..., help="Run id (see `gpt2cloud runs`) or the run's bucket URL (<bucket>/<run>)."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="Local directory (default: runs/RUN)."),
    latest: bool = typer.Option(False, "--latest", help="The newest complete checkpoint (the default)."),
    step: Optional[int] = typer.Option(None, "--step", help="The checkpoint of this step."),
    all_: bool = typer.Option(False, "--all", help="Every complete checkpoint in the bucket."),
    logs: bool = typer.Option(False, "--logs", help="Also the nodes' console logs."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Download a run's checkpoint(s), metrics and logs; every file is verified, a rerun resumes."""
    from gpt2cloud.cli import print_json
    from gpt2cloud.errors import UserError

    if sum([latest, step is not None, all_]) > 1:
        raise UserError("choose one of --latest, --step N and --all")
    out = fetch(run, dest, step=step, all_=all_, logs=logs)
    if as_json:
        print_json(out)
        return
    if out["checkpoint"]:
        typer.echo(f"checkpoint: {out['checkpoint']}  (all files sha256-verified)")
        typer.echo(f"  talk to it: gpt2cloud sample {out['checkpoint']}")
    else:
        typer.echo(f"no complete checkpoint in {out['url']} yet")
    if out["metrics"]:
        typer.echo(f"metrics:    {out['metrics']}")
    for p in out["logs"]:
        typer.echo(f"log:        {p}")
