"""Token batches from a directory of llm.c `.bin` shards, with a position that a checkpoint can hold.

Which shards: names containing `val` are validation; if no name does, the first shard (shard 0,
as llm.c numbers them) is. The rest, sorted by name, are training shards, read in order and
wrapped around to the first after the last.

How a step is read: one optimizer step consumes `tokens_per_step` consecutive tokens of the
current shard, cut into micro-batches of B*T tokens. Micro-batch k of the step goes to
(micro-step k // world_size, rank k % world_size), so each rank reads its own stride of every
batch, and the tokens a step sees do not depend on how it is split: 2 ranks x 1 micro-step
read exactly what 1 rank x 2 micro-steps reads. A shard changes only between steps (a step never
straddles two shards), which keeps that true at shard ends and lets a run resume on a different
number of ranks. The position (shard name, offset of the next step) is all a checkpoint needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.shards import ShardError, read_header, read_shard


def find_shards(data_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(train shards, validation shards) of a directory; every header is checked first.

    Raises ShardError naming the file for a bad magic, wrong version or truncated shard, and
    FileNotFoundError when the directory or its shards are missing.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    shards = sorted(p for p in data_dir.iterdir() if p.suffix == ".bin" and p.is_file())
    if not shards:
        raise FileNotFoundError(f"no .bin token shards in {data_dir} (run `gpt2cloud data prepare` first)")
    for p in shards:
        read_header(p)  # fail now, naming the file, rather than hours into the run
    val = [p for p in shards if "val" in p.name]
    if not val and len(shards) > 1:
        val = shards[:1]  # llm.c convention: shard 0 is validation
    train = [p for p in shards if p not in val]
    if not train:
        raise FileNotFoundError(f"{data_dir} holds only validation shards; training needs at least one more")
    return train, val


class TokenLoader:
    """Micro-batches (x, y) of shape (B, T) for one rank, `accum` micro-steps per optimizer step."""

    def __init__(self, shards: list[Path], B: int, T: int, rank: int, world_size: int, accum: int,
                 log=print):
        self.B, self.T, self.rank, self.world, self.accum = B, T, rank, world_size, accum
        self.step_tokens = B * T * world_size * accum
        # a shard shorter than one step (+1 for the shifted targets) cannot feed a step: skip it,
        # e.g. the short last shard a data preparation leaves behind
        self.shards = [p for p in shards if read_header(p) >= self.step_tokens + 1]
        for p in shards:
            if p not in self.shards and rank == 0:
                log(f"note: skipping {p.name}: fewer than {self.step_tokens + 1} tokens (one step)")
        if not self.shards:
            raise ShardError(
                f"no shard holds at least one step of tokens ({self.step_tokens + 1}); prepare more data "
                f"or use a smaller tokens_per_step (shards: {', '.join(str(p) for p in shards)})"
            )
        self.rewind()

    def rewind(self) -> None:
        """Back to the first step of the first shard (validation reads the same batches every time)."""
        self.set_state({"shard": self.shards[0].name, "position": 0})

    def state(self) -> dict:
        """Where the next step starts; only valid between steps."""
        assert self.micro == 0, "loader state is taken between optimizer steps"
        return {"shard": self.shards[self.shard_index].name, "position": self.position}

    def set_state(self, state: dict) -> None:
        names = [p.name for p in self.shards]
        if state["shard"] not in names:
            raise ShardError(
                f"the checkpoint's data position is in shard {state['shard']}, which is not among the "
                f"training shards ({', '.join(names)}); use the same data directory to resume"
            )
        self.shard_index = names.index(state["shard"])
        self.tokens = read_shard(self.shards[self.shard_index])
        self.position = int(state["position"])
        self.micro = 0

    def _next_shard(self):
        self.shard_index = (self.shard_index + 1) % len(self.shards)  # wrap around after the last
        self.tokens = read_shard(self.shards[self.shard_index])
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        if self.micro == 0 and self.position + self.step_tokens + 1 > len(self.tokens):
            self._next_shard()
        start = self.position + (self.micro * self.world + self.rank) * B * T
        buf = torch.from_numpy(self.tokens[start: start + B * T + 1].astype(np.int64))
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.micro += 1
        if self.micro == self.accum:
            self.micro = 0
            self.position += self.step_tokens
        return x, y
