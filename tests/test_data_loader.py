"""model/data.py: which shards, what each rank reads, shard changes, resumable position, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.data import TokenLoader, find_shards
from model.shards import HEADER_BYTES, ShardError, write_shard

B, T = 2, 4  # 8 tokens per micro-batch


def _shards(tmp_path, sizes, val=True):
    """Shards whose tokens are their global offsets (mod 2**16), so a batch shows where it came from."""
    paths, start = [], 0
    if val:
        write_shard(tmp_path / "d_val_000000.bin", np.arange(100) % 7)
    for i, n in enumerate(sizes, start=1):
        p = tmp_path / f"d_train_{i:06d}.bin"
        write_shard(p, (np.arange(n) + start) % 2**16)
        paths.append(p)
        start += 1000
    return paths


def test_val_by_name_or_shard_zero(tmp_path):
    _shards(tmp_path, [50, 50])
    train, val = find_shards(tmp_path)
    assert [p.name for p in val] == ["d_val_000000.bin"]
    assert [p.name for p in train] == ["d_train_000001.bin", "d_train_000002.bin"]
    (tmp_path / "d_val_000000.bin").unlink()
    train, val = find_shards(tmp_path)  # no 'val' in any name: the first shard is validation
    assert [p.name for p in val] == ["d_train_000001.bin"] and [p.name for p in train] == ["d_train_000002.bin"]


def test_ranks_read_their_stride_and_split_does_not_matter(tmp_path):
    train = _shards(tmp_path, [200])
    # 1 rank x 4 micro-steps, 2 ranks x 2, 4 ranks x 1: one step reads the same 32 tokens
    one = TokenLoader(train, B, T, rank=0, world_size=1, accum=4)
    expected = torch.cat([one.next_batch()[0] for _ in range(4)])
    assert expected.flatten().tolist() == list(range(32))
    for world, accum in [(2, 2), (4, 1)]:
        loaders = [TokenLoader(train, B, T, r, world, accum) for r in range(world)]
        per_rank = [[ld.next_batch() for _ in range(accum)] for ld in loaders]
        # micro-batch k of the step belongs to micro-step k // world on rank k % world
        got = torch.cat([per_rank[k % world][k // world][0] for k in range(4)])
        assert torch.equal(got, expected)
        x, y = per_rank[1][0]
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
        assert y[-1, -1] == x[-1, -1] + 1


def test_moves_to_next_shard_and_wraps_around(tmp_path):
    train = _shards(tmp_path, [40, 45])  # 16 tokens (+1 target) per step: 2 steps fit in each shard
    ld = TokenLoader(train, B, T, 0, 1, accum=2)
    starts = []
    for _ in range(6):
        starts.append(int(ld.next_batch()[0][0, 0]))
        ld.next_batch()
    assert starts == [0, 16, 1000, 1016, 0, 16]


def test_state_resumes_exactly(tmp_path):
    train = _shards(tmp_path, [40, 50])
    ld = TokenLoader(train, B, T, 0, 1, accum=2)
    for _ in range(5):
        ld.next_batch()
    with pytest.raises(AssertionError):
        ld.state()  # only between steps
    ld.next_batch()
    state = ld.state()
    assert state == {"shard": "d_train_000002.bin", "position": 16}
    after = [ld.next_batch()[0] for _ in range(6)]
    fresh = TokenLoader(train, B, T, 0, 1, accum=2)
    fresh.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(after, [fresh.next_batch()[0] for _ in range(6)]))
    with pytest.raises(ShardError, match="d_train_000009.bin"):
        fresh.set_state({"shard": "d_train_000009.bin", "position": 0})
    fresh.rewind()  # what validation does before each evaluation: the first step again
    assert fresh.state() == {"shard": "d_train_000001.bin", "position": 0}
    assert fresh.next_batch()[0].flatten().tolist() == list(range(8))


def test_short_shards_are_skipped_or_refused(tmp_path):
    train = _shards(tmp_path, [40, 10])
    notes = []
    ld = TokenLoader(train, B, T, 0, 1, accum=2, log=notes.append)
    assert [p.name for p in ld.shards] == ["d_train_000001.bin"] and "d_train_000002.bin" in notes[0]
    with pytest.raises(ShardError, match="one step"):
        TokenLoader(train, B, T, 0, 1, accum=8)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\x00\x00\x00\x00" + b[4:], "bad magic"),
    (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version 7"),
    (lambda b: b[:-3], "truncated"),
    (lambda b: b[:100], "truncated"),
])
def test_bad_shard_stops_naming_the_file(tmp_path, damage, message):
    _shards(tmp_path, [50, 50])
    bad = tmp_path / "d_train_000002.bin"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(ShardError, match=message) as e:
        find_shards(tmp_path)
    assert str(bad) in str(e.value)


def test_missing_dir_or_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_shards(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no .bin token shards"):
        find_shards(tmp_path)
    write_shard(tmp_path / "x_val_000000.bin", np.arange(10))
    with pytest.raises(FileNotFoundError, match="only validation"):
        find_shards(tmp_path)
    assert (tmp_path / "x_val_000000.bin").stat().st_size == HEADER_BYTES + 20
