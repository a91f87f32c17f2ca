"""What `data prepare --on-cloud` costs: a CPU VM that streams a dataset, tokenizes it on all its cores
and uploads the shards, billed from its start to its autodown.

The rates are assumptions named below, except the tokenizer's, which was measured. Plain arithmetic,
like the rest of cost/: the VM's price comes in as a Price (gpt2cloud/launch/clouds.py vm_price).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from gpt2cloud.cost.prices import Price

# Measured: GPT-2 tokenizing with one worker process per core (issue 14).
TOKENS_PER_CORE_S = 3.4e6
# Assumed, not measured here (no network on the machine that wrote this):
PROVISION_S = 240  # a CPU VM up and reachable
SETUP_S = 90  # a venv and the prepare job's requirements from PyPI
DOWNLOAD_MB_S = 100.0  # the `datasets` library streaming parquet from the hub to a cloud VM
DOWNLOAD_BYTES_PER_TOKEN = 2.8  # fineweb-edu's parquet: ~28 GB for sample-10BT (text plus metadata columns)
UPLOAD_MB_S = 200.0  # boto3's multipart upload from a cloud VM to a bucket
TEXT_BYTES_PER_TOKEN = 4.0  # English text under GPT-2's tokenizer (a local source's size -> tokens)
SHARD_BYTES_PER_TOKEN = 2  # uint16


@dataclass(frozen=True)
class PrepareEstimate:
    tokens: Optional[float]  # None: unknown (a hub dataset whose config names no size)
    tokens_from: str  # where that figure comes from
    phases: tuple  # (name, seconds, detail), in order
    price: Price  # the VM's, per VM-hour (0 on this machine)
    cpus: int  # cores that tokenize: --cpus, or this machine's
    idle_minutes: int = 0  # autodown this long after the job: billed too

    @property
    def usd_per_hour(self) -> float:
        return self.price.usd_per_hour

    @property
    def price_from(self) -> str:
        return self.price.source

    @property
    def seconds(self) -> Optional[float]:
        """The phases' sum, but the download and the tokenizing overlap (the VM tokenizes what it has
        streamed so far): of those two, the longer counts."""
        if self.tokens is None:
            return None
        t = dict((name, s) for name, s, _ in self.phases)
        overlapped = max(t.pop("download", 0.0), t.pop("tokenize", 0.0))
        return sum(t.values()) + overlapped

    @property
    def usd(self) -> Optional[float]:
        # billed from the VM's start to autodown, idle_minutes after the job
        s = self.seconds
        if s is None:
            return None
        return (s + (self.idle_minutes * 60 if self.usd_per_hour else 0)) / 3600 * self.usd_per_hour


def expected_tokens(source: str, local_bytes: Optional[int], limit_tokens: Optional[int]) -> tuple[Optional[float], str]:
    """How many tokens the job will write, as well as it can be known before streaming: local_bytes is
    a local source's size (None for a hub dataset, whose config name may say, e.g. sample-10BT)."""
    tokens, where = None, "unknown: the dataset's config names no size (pass --limit-tokens to bound it)"
    m = re.search(r":.*?(\d+(?:\.\d+)?)BT\b", source)
    if local_bytes is not None:
        tokens = local_bytes / TEXT_BYTES_PER_TOKEN
        where = f"from the files' size, ~{TEXT_BYTES_PER_TOKEN:g} bytes a token"
    elif m:
        tokens, where = float(m.group(1)) * 1e9, f"from the config's name, {m.group(0)[1:]}"
    if limit_tokens and (tokens is None or limit_tokens < tokens):
        tokens, where = float(limit_tokens), "--limit-tokens"
    return tokens, where


def estimate_prepare(tokens: Optional[float], tokens_from: str, cpus: int, local: bool, hub: bool,
                     price: Price, idle_minutes: int = 0) -> PrepareEstimate:
    t = tokens or 0.0
    rate = TOKENS_PER_CORE_S * cpus
    tokenize = (t / rate, f"{TOKENS_PER_CORE_S / 1e6:g}M tokens/s per core x {cpus}")
    if local:
        return PrepareEstimate(tokens, tokens_from, (("tokenize",) + tokenize,), price, cpus)
    down_gb = t * DOWNLOAD_BYTES_PER_TOKEN / 1e9 if hub else 0.0
    up_gb = t * SHARD_BYTES_PER_TOKEN / 1e9
    phases = (
        ("provision", PROVISION_S, "a CPU VM up (assumed)"),
        ("setup", SETUP_S, "Python packages from PyPI (assumed)"),
        ("download", down_gb * 1e3 / DOWNLOAD_MB_S,
         f"~{down_gb:,.0f} GB of parquet streamed at {DOWNLOAD_MB_S:g} MB/s (assumed), while tokenizing"),
        ("tokenize",) + tokenize,
        ("upload", up_gb * 1e3 / UPLOAD_MB_S, f"~{up_gb:,.0f} GB of shards at {UPLOAD_MB_S:g} MB/s (assumed)"),
    )
    return PrepareEstimate(tokens, tokens_from, phases, price, cpus, idle_minutes)


def disk_gb(tokens: Optional[float], minimum: int) -> int:
    """The VM's disk: the shards sit on it until uploaded (with a quarter and 50 GB to spare)."""
    shard_gb = (tokens or 0) * SHARD_BYTES_PER_TOKEN / 1e9
    return max(minimum, int(-(-shard_gb * 1.25 // 1)) + 50)
