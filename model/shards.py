"""The llm.c `.bin` token shard: a header of 256 int32 (magic, version, token count), then uint16 tokens.

Both `gpt2cloud data prepare` (writer) and the trainer's data loader (reader) use this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2cloud.store import atomic_write

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(ValueError):
    """A shard file that is not a valid llm.c shard; the message names the file and the problem."""


def write_shard(path: str | Path, tokens) -> None:
    """Write tokens atomically: a reader (or a rerun after a crash) never sees a partial shard."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    atomic_write(path, header.tobytes(), memoryview(np.ascontiguousarray(tokens, dtype="<u2")).cast("B"))


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated shard ({size} bytes, smaller than the 1024-byte header)")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not an llm.c token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    n = int(header[2])
    if size != HEADER_BYTES + 2 * n:
        raise ShardError(
            f"{path}: truncated or padded shard: header says {n} tokens ({HEADER_BYTES + 2 * n} bytes), "
            f"file has {size} bytes; re-download or re-prepare it"
        )
    return n


def read_shard(path: str | Path) -> np.ndarray:
    """Tokens of a validated shard as a read-only uint16 memory map."""
    n = read_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))


def check_tokens(path: str | Path, vocab_size: int) -> int:
    """The shard's largest token id; ShardError when it is outside the vocabulary. Checked before any
    step: ids >= the padded vocabulary crash the embedding lookup hours into a run, and ids between the
    vocabulary and its padding train silently on rows no tokenizer produces."""
    tokens = read_shard(path)
    top = int(tokens.max()) if tokens.size else 0  # vectorised over the memory map: ~0.1 s per 100M tokens
    if top >= vocab_size:
        raise ShardError(f"{path}: token id {top} in a shard, but GPT-2's vocabulary has {vocab_size} ids "
                         f"(0 to {vocab_size - 1}): not GPT-2 tokens; re-prepare the data with `gpt2cloud data "
                         "prepare` (or download a GPT-2-tokenized set)")
    return top
