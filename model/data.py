"""Token batches from a directory of llm.c `.bin` shards, with a position that a checkpoint can hold.

Which shards: names containing `val` are validation; if no name does, the first shard (shard 0,
as llm.c numbers them) is. The rest, sorted by name, are training shards, read in order and
wrapped around to the first after the last. A directory with a manifest.json takes its shards from
it, and a shard a download is still bringing is waited for (model/datadir.py, model/streamdata.py).

How a step is read: one optimizer step consumes `tokens_per_step` consecutive tokens of the
current shard, cut into micro-batches of B*T tokens. Micro-batch k of the step goes to
(micro-step k // world_size, rank k % world_size), so each rank reads its own stride of every
batch, and the tokens a step sees do not depend on how it is split: 2 ranks x 1 micro-step
read exactly what 1 rank x 2 micro-steps reads. A shard changes only between steps (a step never
straddles two shards), which keeps that true at shard ends and lets a run resume on a different
number of ranks. The position (shard name, offset of the next step) is all a checkpoint needs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from model import datadir
from model.shards import HEADER_BYTES, ShardError, check_tokens, read_header, read_shard
from model.tokenizer import VOCAB_SIZE

POLL_SECONDS = 0.5  # how often a loader waiting for a shard looks again
WAIT_LOG_SECONDS = 30.0  # and how often it says so


class Arrivals:
    """The shards of one directory, some of which a download may still be bringing (model/datadir.py).

    Without a manifest in the directory every shard must be there. With one, a listed shard that is
    not there yet is waited for while the download runs; its token count comes from the manifest's size.
    """

    def __init__(self, data_dir: Path, log=print):
        self.dir, self.log = Path(data_dir), log
        try:
            files = datadir.manifest_files(self.dir)
        except ValueError as e:
            raise ShardError(str(e)) from None
        self.expected = {f["name"]: f["size"] for f in files or []}
        self.on_wait = None  # called while a download that is still moving bytes keeps us waiting

    def unavailable(self) -> str | None:
        """Why a shard that is not here will not come, or None while the download may still bring it."""
        status = datadir.read_status(self.dir)
        if status is not None and status.get("state") == datadir.COMPLETE:
            return "the data download finished without it (deleted since?); download the data again"
        return datadir.failure(status)

    def tokens(self, path: Path) -> int:
        """The shard's token count: its header, checked, or (not arrived yet) its size in the manifest."""
        size = self.expected.get(path.name)
        if path.is_file():
            n = read_header(path)
            if size is not None and path.stat().st_size != size:
                raise ShardError(f"{path}: {path.stat().st_size} bytes, its manifest says {size}; download it again")
            return n
        if size is None:
            raise FileNotFoundError(f"shard {path} does not exist")
        why = self.unavailable()
        if why:
            raise ShardError(f"{path} is listed in the manifest but not there: {why}")
        if size < HEADER_BYTES or (size - HEADER_BYTES) % 2:
            raise ShardError(f"{path.name}: the manifest says {size} bytes, which no llm.c shard has")
        return (size - HEADER_BYTES) // 2

    def wait_for(self, path: Path) -> None:
        """Return once the shard is here, checked against the manifest; ShardError if it will not come."""
        said, moved = -WAIT_LOG_SECONDS, None
        while not path.is_file():
            why = self.unavailable()
            if why and not path.is_file():  # (it may have landed just before the download ended)
                raise ShardError(f"shard {path.name} never arrived: {why}")
            status = datadir.read_status(self.dir) or {}
            if time.monotonic() - said >= WAIT_LOG_SECONDS:
                said = time.monotonic()
                arrived = sum((self.dir / n).is_file() for n in self.expected)
                self.log(f"waiting for shard {path.name} ({arrived} of {len(self.expected)} arrived)")
            if self.on_wait is not None and moved is not None and status.get("bytes", 0) > moved:
                self.on_wait(f"waiting for shard {path.name}")  # a slow download is not a stall
            moved = status.get("bytes", 0)
            time.sleep(POLL_SECONDS)
        self.tokens(path)


def find_shards(data_dir: str | Path, vocab_size: int = VOCAB_SIZE) -> tuple[list[Path], list[Path]]:
    """(train shards, validation shards) of a directory; every header is checked first, and the token
    ids of every shard already there against `vocab_size` (the model's): once, before any step (a shard
    still downloading is checked by the download, before it gets its name).

    With a manifest (model/datadir.py) the lists are the manifest's shards, some of which a download
    may still be bringing; without one, the .bin files in the directory. Raises ShardError naming
    the file for a bad magic, wrong version or truncated shard or a token id outside the vocabulary
    (model/shards.py check_tokens), and FileNotFoundError when the
    directory or its shards are missing.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    arrivals = Arrivals(data_dir)
    if arrivals.expected:
        names = [n for n in arrivals.expected if datadir.is_shard(n)]
    else:
        names = [p.name for p in data_dir.iterdir() if p.suffix == datadir.SHARD_SUFFIX and p.is_file()]
    if not names:
        raise FileNotFoundError(f"no .bin token shards in {data_dir} (run `gpt2cloud data prepare` first)")
    for n in names:
        arrivals.tokens(data_dir / n)  # fail now, naming the file, rather than hours into the run
        if (data_dir / n).is_file():
            check_tokens(data_dir / n, vocab_size)
    train, val = datadir.split_names(names)
    if not train:
        raise FileNotFoundError(f"{data_dir} holds only validation shards; training needs at least one more")
    return [data_dir / n for n in train], [data_dir / n for n in val]


class TokenLoader:
    """Micro-batches (x, y) of shape (B, T) for one rank, `accum` micro-steps per optimizer step.

    A shard still on its way (a manifest lists it, a download is bringing it) is waited for when the
    loader gets to it, with a log line now and then; the batches are those of a complete directory."""

    def __init__(self, shards: list[Path], B: int, T: int, rank: int, world_size: int, accum: int,
                 log=print):
        self.B, self.T, self.rank, self.world, self.accum = B, T, rank, world_size, accum
        self.step_tokens = B * T * world_size * accum
        shards = [Path(p) for p in shards]
        self.arrivals = {d: Arrivals(d, log) for d in {p.parent for p in shards}}
        # a shard shorter than one step (+1 for the shifted targets) cannot feed a step: skip it,
        # e.g. the short last shard a data preparation leaves behind
        self.shards = [p for p in shards if self.arrivals[p.parent].tokens(p) >= self.step_tokens + 1]
        for p in shards:
            if p not in self.shards and rank == 0:
                log(f"note: skipping {p.name}: fewer than {self.step_tokens + 1} tokens (one step)")
        if not self.shards:
            raise ShardError(
                f"no shard holds at least one step of tokens ({self.step_tokens + 1}); prepare more data "
                f"or use a smaller tokens_per_step (shards: {', '.join(str(p) for p in shards)})"
            )
        self.rewind()

    def set_heartbeat(self, beat) -> None:
        """Call beat(what) while a moving download keeps the loader waiting (the trainer's watchdog)."""
        for arrivals in self.arrivals.values():
            arrivals.on_wait = beat

    def _load(self, index: int) -> None:
        path = self.shards[index]
        self.arrivals[path.parent].wait_for(path)
        self.shard_index, self.tokens = index, read_shard(path)

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
        self._load(names.index(state["shard"]))
        self.position = int(state["position"])
        self.micro = 0

    def _next_shard(self):
        self._load((self.shard_index + 1) % len(self.shards))  # wrap around after the last
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
