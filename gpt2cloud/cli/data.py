"""`gpt2cloud data prepare | upload | download`: token shards from text, to and from object storage."""

from __future__ import annotations

import sys
from contextlib import closing
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from gpt2cloud.cli.output import key_values, print_json, show_task
from gpt2cloud.errors import UserError
from gpt2cloud.units import duration, human, usd

ENDPOINT_HELP = "S3-compatible endpoint (Cloudflare R2, MinIO, ...); default: AWS_ENDPOINT_URL or AWS."


def prepare_command(
    source: str = typer.Argument(..., help="A .txt/.jsonl/.parquet file, a directory of them, or a Hugging "
                                           "Face dataset such as HuggingFaceFW/fineweb-edu:sample-10BT."),
    out: str = typer.Option(..., "--out", help="Directory for the shards and manifest.json (with --on-cloud: "
                                               "s3://BUCKET/PREFIX, the bucket the VM writes to)."),
    shard_tokens: int = typer.Option(100_000_000, "--shard-tokens", help="Tokens per train shard (llm.c: 100M)."),
    val_tokens: int = typer.Option(10_000_000, "--val-tokens", help="Tokens of the val shard (the first ones)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Tokenizer processes (default: CPU count)."),
    limit_tokens: Optional[int] = typer.Option(None, "--limit-tokens", help="Stop after this many tokens."),
    name: Optional[str] = typer.Option(None, "--name", help="Shard name prefix (default: from SOURCE)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object; no progress bar."),
    on_cloud: bool = typer.Option(False, "--on-cloud", help="Tokenize on a cloud CPU VM (SkyPilot) that writes "
                                  "straight to --out s3://... and removes itself when done; shows its estimate first."),
    cpus: Optional[int] = typer.Option(None, "--cpus", help="--on-cloud: vCPUs of the VM (at least; default 32)."),
    infra: Optional[str] = typer.Option(None, "--infra", help="--on-cloud: aws, gcp, ... (optionally /region), or "
                                        "local (this machine); default: the cheapest enabled cloud."),
    dry_run: bool = typer.Option(False, "--dry-run", help="--on-cloud: print the estimate and the SkyPilot YAML "
                                 "(secrets redacted); launch nothing."),
    export_yaml: Optional[Path] = typer.Option(None, "--export-yaml", help="--on-cloud: write the SkyPilot YAML "
                                               "for `sky launch FILE` (secrets redacted); launch nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="--on-cloud: do not ask for confirmation."),
):
    """Tokenize text with GPT-2's tokenizer into llm.c .bin shards plus manifest.json (resumable)."""
    from gpt2cloud.data.prepare import prepare

    if on_cloud:
        return prepare_on_cloud(source, out, cpus=cpus, infra=infra, name=name, shard_tokens=shard_tokens,
                                val_tokens=val_tokens, limit_tokens=limit_tokens, workers=workers,
                                dry_run=dry_run, export_yaml=export_yaml, yes=yes, as_json=as_json)
    given = [flag for flag, v in (("--cpus", cpus), ("--infra", infra), ("--dry-run", dry_run or None),
                                  ("--export-yaml", export_yaml), ("--yes", yes or None)) if v is not None]
    if given:
        raise UserError(f"{', '.join(given)}: only with --on-cloud (a local prepare runs here, at once)")
    r = prepare(source, out, name=name, shard_tokens=shard_tokens, val_tokens=val_tokens, workers=workers,
                limit_tokens=limit_tokens, progress=not as_json)
    if as_json:
        print_json(r)
        return
    speed = (f"{r['text_mb_per_s']:.1f} MB/s, {r['tokens_per_s']:,} tokens/s with {r['workers']} workers"
             if "tokens_per_s" in r else "nothing to do: already complete")
    key_values([
        ("shards", f"{r['shards']} in {r['out']} ({r['resumed_shards']} kept from an earlier run)"),
        ("tokens", f"{r['tokens']:,} (val {r['val_tokens']:,}, train {r['train_tokens']:,})"),
        ("documents", f"{r['documents']:,} ({r['text_bytes'] / 1e6:,.1f} MB of text)"),
        ("speed", f"{speed}; {r['seconds']:.1f} s"),
        ("manifest", r["manifest"]),
    ])


def _print_job(job, console: Console) -> None:
    """The on-cloud job and its estimate, before anything is asked or launched."""
    from gpt2cloud.cost.prepare import TOKENS_PER_CORE_S
    from gpt2cloud.names import ANY, LOCAL

    est, s = job.est, job.spec
    where = {LOCAL: "this machine (the job's scripts run here, as SkyPilot would run them)",
             ANY: f"the cheapest of {', '.join(job.clouds)} (SkyPilot any_of)" if job.clouds else
             "the cheapest enabled cloud, chosen by SkyPilot at launch (none is enabled here: `sky check`)"}
    rows = [("prepare job", f"{s.run_id}: {job.source} -> {job.out}"),
            ("where", where.get(s.infra, s.infra))]
    if s.infra != LOCAL:
        rows.append(("VM", f"{job.cpus}+ vCPUs, {job.memory_gb}+ GB memory, {job.disk_gb} GB disk, no GPU; "
                           f"removed {s.idle_minutes} min after the job ends (autostop with down)"))
    rows.append(("tokens", f"~{human(est.tokens)} ({est.tokens_from})" if est.tokens else est.tokens_from))
    for phase, seconds, detail in est.phases:
        rows.append((f"  {phase}", f"{duration(seconds) if est.tokens else '-'}  {detail}"))
    overlap = " (download and tokenize overlap: the longer counts)" if s.infra != LOCAL else ""
    rows.append(("time", f"~{duration(est.seconds)}{overlap}" if est.seconds is not None else
                 f"- ({human(est.cpus * 3600 * TOKENS_PER_CORE_S)} tokens an hour on {est.cpus} cores)"))
    if s.infra != LOCAL:
        rows.append(("cost", f"~{usd(est.usd)} at {usd(est.usd_per_hour)}/h ({est.price_from})"
                             if est.usd is not None else f"{usd(est.usd_per_hour)}/h ({est.price_from})"))
    if job.secrets:
        rows.append(("secrets", f"{', '.join(sorted(job.secrets))} (passed as SkyPilot secrets, never written or "
                                "printed)"))
    key_values(rows, console)


def prepare_on_cloud(source, out, *, cpus, infra, name, shard_tokens, val_tokens, limit_tokens, workers,
                     dry_run, export_yaml, yes, as_json) -> None:
    """`data prepare --on-cloud`: estimate, confirm, run the job, follow it, report what landed in --out."""
    from gpt2cloud.launch import prepare_job

    offline = dry_run or export_yaml is not None
    job = prepare_job.plan_job(source, out, cpus=cpus, infra=infra, name=name, shard_tokens=shard_tokens,
                               val_tokens=val_tokens, limit_tokens=limit_tokens, workers=workers, offline=offline)
    err = Console(stderr=True)
    if not as_json:
        _print_job(job, err)  # on stderr: a dry run's stdout is the YAML alone
    if offline:
        show_task(job.task_cfg, run_id=job.run_id, local=job.spec.local, dry_run=dry_run, export_yaml=export_yaml,
                  write_workdir=lambda: prepare_job.write_workdir(job), as_json=as_json,
                  estimate={"tokens": job.est.tokens, "seconds": job.est.seconds, "usd": job.est.usd,
                            "usd_per_hour": job.est.usd_per_hour, "price_from": job.est.price_from})
        return
    prepare_job.preflight(job)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("not launching without confirmation: add --yes (stdin is not a terminal)")
        cost = f"estimated {usd(job.est.usd)}" if job.est.usd is not None else "cost unknown"
        if not typer.confirm(f"Launch the prepare job {job.run_id} ({cost})?", default=False, err=True):
            raise UserError("not launched (answered no)")
    record = prepare_job.start_job(job)
    err.print(f"launched {job.run_id}; following its log (Ctrl-C stops following, not the job)")
    r = prepare_job.wait_job(job, record, quiet=as_json)
    if as_json:
        print_json(r)
        return
    key_values([
        ("prepared", f"{r['shards']} shards, {r['tokens']:,} tokens (val {r['val_tokens']:,}, train "
                     f"{r['train_tokens']:,})"),
        ("manifest", r["manifest"]),
        ("next", f"gpt2cloud launch RECIPE --data {r['out']} --bucket s3://..."),
    ])


def upload_command(
    local_dir: str = typer.Argument(..., help="Directory to upload (shards + manifest.json, or a checkpoint)."),
    url: str = typer.Argument(..., help="Destination: s3://BUCKET/PREFIX or file:///PATH."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help=ENDPOINT_HELP),
    force: bool = typer.Option(False, "--force", help="Replace another set that gpt2cloud published at URL: its "
                               "files are deleted first (files no manifest names are never touched)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object; no progress bar."),
):
    """Upload a complete set; objects already there with the same sha256 are skipped, the manifest goes last."""
    from gpt2cloud.store import open_store
    from gpt2cloud.store.layout import MANIFEST
    from gpt2cloud.store.transfer import upload_dir

    if url.strip().lower().startswith("hf://"):
        raise UserError(f"{url}: hf:// is read-only; upload to s3://BUCKET/PREFIX or file:///PATH (publish on the "
                        "Hub with `hf upload`)")
    with closing(open_store(url, endpoint_url=endpoint_url)) as store:
        r = upload_dir(local_dir, store, progress=not as_json, guard=True, force=force)
    if as_json:
        print_json(r)
        return
    key_values([
        ("uploaded", f"{r['uploaded']} files, {r['bytes'] / 1e6:,.1f} MB at {r['mb_per_s'] or 0:,.1f} MB/s"
                     if r["uploaded"] else "nothing: every file is already there"),
        ("skipped", f"{r['skipped']} files already there with the same sha256"),
        ("published", f"{store.url_for(MANIFEST)}" + ("" if r["manifest_uploaded"] else " (unchanged)")),
    ])


def download_command(
    url: str = typer.Argument(..., help="Source: s3://BUCKET/PREFIX or file:///PATH holding a manifest.json."),
    local_dir: str = typer.Argument(..., help="Local directory to fill."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help=ENDPOINT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object; no progress bar."),
):
    """Download a set and verify every file's sha256 against its manifest (resumes; keeps verified files)."""
    from gpt2cloud.store import open_store
    from gpt2cloud.store.sets import GPT2_VOCAB_SIZE
    from gpt2cloud.store.transfer import download_dir

    with closing(open_store(url, endpoint_url=endpoint_url)) as store:
        r = download_dir(store, "", local_dir, progress=not as_json, guard=True, vocab_size=GPT2_VOCAB_SIZE)
    if as_json:
        print_json(r)
        return
    key_values([
        ("downloaded", f"{r['downloaded']} files, {r['bytes'] / 1e6:,.1f} MB at {r['mb_per_s'] or 0:,.1f} MB/s"
                       if r["downloaded"] else "nothing: every file is already here"),
        ("skipped", f"{r['skipped']} files already here and verified"),
        ("verified", f"{r['verified']} files match the manifest's sha256 in {r['dir']}"),
    ])

