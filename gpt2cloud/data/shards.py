"""Filling llm.c token shards from tokenized chunks, for `gpt2cloud data prepare` (prepare.py).

The writer knows the document stream's position at every shard boundary, which is what lets an
interrupted prepare resume byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2cloud.store.transfer import file_entry
from model.shards import write_shard
from model.tokenizer import VOCAB_SIZE


class ShardWriter:
    """Fills shards from tokenized chunks; knows the stream position at every shard boundary.

    A position is (doc, offset): the next token to write is token `offset` of document `doc`.
    `docs` and `text_bytes` count the documents before the position (and their utf-8 bytes), so
    they come out the same whether or not a run was interrupted and resumed.
    """

    def __init__(self, out: Path, name: str, val_tokens: int, shard_tokens: int, limit_tokens: int | None,
                 done: list[dict], on_shard):
        self.out, self.name = out, name
        self.val_tokens, self.shard_tokens, self.limit = val_tokens, shard_tokens, limit_tokens
        self.shards = list(done)  # finished shards (resumed ones first)
        self.on_shard = on_shard
        self.index = done[-1]["index"] + 1 if done else (0 if val_tokens > 0 else 1)
        self.total = sum(s["tokens"] for s in done)
        self.docs = done[-1]["end"][0] if done else 0
        self.text_bytes = done[-1]["text_bytes"] if done else 0
        cap = max(val_tokens, shard_tokens)
        if limit_tokens is not None:
            cap = min(cap, max(limit_tokens - self.total, 1))
        self.buf = np.empty(cap, dtype=np.uint16)  # the one shard-sized buffer: the memory bound
        self.fill = 0

    @property
    def capacity(self) -> int:
        cap = self.val_tokens if self.index == 0 else self.shard_tokens
        if self.limit is not None:
            cap = min(cap, self.limit - (self.total - self.fill))
        return cap

    @property
    def full(self) -> bool:
        return self.limit is not None and self.total >= self.limit

    def add(self, first_doc: int, tokens: np.ndarray, lengths: np.ndarray, doc_bytes: np.ndarray,
            skip: int = 0) -> None:
        """Append a chunk (documents first_doc...) after dropping `skip` already-written tokens,
        closing shards as they fill."""
        if self.full:
            return
        ends = np.cumsum(lengths)
        bytes_before = self.text_bytes  # of the documents before first_doc
        cum_bytes = np.concatenate([[0], np.cumsum(doc_bytes)])

        def position(pos: int) -> tuple[int, int]:
            j = int(np.searchsorted(ends, pos, side="right"))  # first document not wholly before pos
            return (first_doc + j, pos - int(ends[j] - lengths[j])) if j < len(lengths) else (first_doc + j, 0)

        pos = skip
        while pos < len(tokens) and not self.full:
            take = min(self.capacity - self.fill, len(tokens) - pos)
            self.buf[self.fill:self.fill + take] = tokens[pos:pos + take]
            self.fill += take
            self.total += take
            pos += take
            if self.fill == self.capacity:
                doc, offset = position(pos)
                self._close(end=(doc, offset), text_bytes=bytes_before + int(cum_bytes[doc - first_doc]))
        if pos < len(tokens):  # stopped by --limit-tokens inside this chunk
            doc, offset = position(pos)
            self.docs = doc + (offset > 0)
        else:
            self.docs = first_doc + len(lengths)
        self.text_bytes = bytes_before + int(cum_bytes[self.docs - first_doc])

    def finish(self) -> None:
        if self.fill:
            self._close(end=(self.docs, 0), text_bytes=self.text_bytes)

    def _close(self, end: tuple[int, int], text_bytes: int) -> None:
        split = "val" if self.index == 0 else "train"
        path = self.out / f"{self.name}_{split}_{self.index:06d}.bin"
        tokens = self.buf[:self.fill]
        top = int(tokens.max())  # recorded in the manifest; the tokenizer never exceeds its vocabulary
        if top >= VOCAB_SIZE:
            raise ValueError(f"{path.name}: token id {top} >= the vocabulary size {VOCAB_SIZE}")
        write_shard(path, tokens)
        self.shards.append({**file_entry(self.out, path.name), "split": split, "index": self.index,
                            "tokens": self.fill, "max_token": top, "end": list(end), "text_bytes": text_bytes})
        self.index += 1
        self.fill = 0
        self.on_shard(self.shards)
