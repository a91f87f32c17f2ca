"""`gpt2cloud data prepare | upload | download`: token shards from text, to and from object storage."""

from __future__ import annotations

from contextlib import closing
from typing import Optional

import typer

from gpt2cloud.cli.output import key_values, print_json

ENDPOINT_HELP = "S3-compatible endpoint (Cloudflare R2, MinIO, ...); default: AWS_ENDPOINT_URL or AWS."


def prepare_command(
    source: str = typer.Argument(..., help="A .txt/.jsonl/.parquet file, a directory of them, or a Hugging "
                                           "Face dataset such as HuggingFaceFW/fineweb-edu:sample-10BT."),
    out: str = typer.Option(..., "--out", help="Directory for the shards and manifest.json."),
    shard_tokens: int = typer.Option(100_000_000, "--shard-tokens", help="Tokens per train shard (llm.c: 100M)."),
    val_tokens: int = typer.Option(10_000_000, "--val-tokens", help="Tokens of the val shard (the first ones)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Tokenizer processes (default: CPU count)."),
    limit_tokens: Optional[int] = typer.Option(None, "--limit-tokens", help="Stop after this many tokens."),
    name: Optional[str] = typer.Option(None, "--name", help="Shard name prefix (default: from SOURCE)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object; no progress bar."),
):
    """Tokenize text with GPT-2's tokenizer into llm.c .bin shards plus manifest.json (resumable)."""
    from gpt2cloud.data.prepare import prepare

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


def upload_command(
    local_dir: str = typer.Argument(..., help="Directory to upload (shards + manifest.json, or a checkpoint)."),
    url: str = typer.Argument(..., help="Destination: s3://BUCKET/PREFIX or file:///PATH."),
    endpoint_url: Optional[str] = typer.Option(None, "--endpoint-url", help=ENDPOINT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object; no progress bar."),
):
    """Upload a directory; objects already there with the same sha256 are skipped, the manifest goes last."""
    from gpt2cloud.store import open_store
    from gpt2cloud.store.layout import MANIFEST
    from gpt2cloud.store.transfer import upload_dir

    with closing(open_store(url, endpoint_url=endpoint_url)) as store:
        r = upload_dir(local_dir, store, progress=not as_json)
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
    from gpt2cloud.store.transfer import download_dir

    with closing(open_store(url, endpoint_url=endpoint_url)) as store:
        r = download_dir(store, "", local_dir, progress=not as_json)
    if as_json:
        print_json(r)
        return
    key_values([
        ("downloaded", f"{r['downloaded']} files, {r['bytes'] / 1e6:,.1f} MB at {r['mb_per_s'] or 0:,.1f} MB/s"
                       if r["downloaded"] else "nothing: every file is already here"),
        ("skipped", f"{r['skipped']} files already here and verified"),
        ("verified", f"{r['verified']} files match the manifest's sha256 in {r['dir']}"),
    ])

