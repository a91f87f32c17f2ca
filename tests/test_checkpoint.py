"""model/checkpoint.py: layout, manifest, completeness, verification, pruning and loading."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model import checkpoint as ckpt
from model.gpt import GPT
from trainer_helpers import tiny_config


def _save(out, step, model=None, keep=3, world=2):
    cfg = tiny_config()
    model = model or GPT(cfg.model)
    opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), 1e-8, "cpu")
    x = torch.randint(0, 256, (2, 8))
    model(x, x)[1].backward()
    opt.step()
    state = {"step": step, "tokens_seen": step * 256, "elapsed_seconds": 1.5, "loss": 5.0,
             "data": {"shard": "a.bin", "position": 0}, "world_size": world, "grad_accum": 1}
    rngs = [ckpt.rng_state() for _ in range(world)]
    path = ckpt.write_checkpoint(out, step, model, {"optimizer": opt.state_dict(), "scaler": None}, state, rngs,
                                 dataclasses.asdict(cfg), keep)
    return path, model, opt


def test_layout_manifest_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    path, model, opt = _save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_000007"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt",
                     "trainer_state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "gpt2cloud-checkpoint" and manifest["version"] == 1
    assert manifest["step"] == 7 and manifest["world_size"] == 2 and manifest["recipe"] == "test-tiny"
    assert manifest["config"]["model"]["padded_vocab_size"] == 256
    assert {f["name"] for f in manifest["files"]} == set(names) - {"manifest.json"}

    from safetensors.torch import load_file
    stored = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in stored and not any(k.startswith("_orig_mod.") for k in stored)

    loaded = ckpt.load_model(path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    newest = ckpt.load_model(tmp_path)  # a run's OUT dir: its newest checkpoint
    assert torch.equal(newest.transformer.wte.weight, model.transformer.wte.weight)

    # the training state: optimizer moments and every file through torch.load(weights_only=True)
    fresh = GPT(tiny_config().model)
    fresh_opt = fresh.configure_optimizer(1e-3, 0.1, (0.9, 0.95), 1e-8, "cpu")
    state = ckpt.load_training_state(path, fresh, fresh_opt, None, rank=1, device="cpu")
    assert state["step"] == 7 and state["rng_restored"]
    a, b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    assert not ckpt.load_training_state(path, fresh, fresh_opt, None, rank=2, device="cpu")["rng_restored"]


def test_rng_state_roundtrip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000006", "step_000008"]
    (root / "step_000010").mkdir()  # a killed run's half-written checkpoint: no manifest
    (root / "step_000010" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_000008"
    assert ckpt.latest_checkpoint(root) == root / "step_000008"
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_model(root / "step_000010")
    _save(tmp_path, 12, keep=2)  # the leftover older than the newest complete one goes too
    assert sorted(p.name for p in root.iterdir()) == ["step_000008", "step_000012"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_names_the_damaged_file(tmp_path, damage):
    path, _, _ = _save(tmp_path, 3)
    bad = path / "optimizer.pt"
    data = bytearray(bad.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
    elif damage == "truncate":
        bad.write_bytes(bytes(data[:-10]))
    else:
        bad.unlink()
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.verify_checkpoint(path)
    assert str(bad) in str(e.value)
    ckpt.load_model(path)  # sampling reads (and verifies) only the weights
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_model(path)


def test_hf_format_dir_goes_to_load_hf(tmp_path, monkeypatch):
    import model.hf

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "model.safetensors").write_bytes(b"")
    sentinel = GPT(tiny_config().model)
    monkeypatch.setattr(model.hf, "load_hf", lambda p: sentinel if p == hf_dir else None)
    assert ckpt.load_model(hf_dir) is sentinel
    # a sharded save: model.safetensors.index.json and its shards, no model.safetensors
    (hf_dir / "model.safetensors").rename(hf_dir / "model-00001-of-00002.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    assert ckpt.load_model(hf_dir) is sentinel
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint"):
        ckpt.load_model(tmp_path)


# ---- a diverged run cannot cost the run its good checkpoints ----


def _poison(model: GPT) -> GPT:
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    return model


def test_non_finite_weights_are_never_written_and_rotate_nothing_out(tmp_path):
    for step in (2, 4):
        _save(tmp_path, step, keep=2)
    root = tmp_path / "checkpoints"
    assert ckpt.weights_finite(GPT(tiny_config().model)) and not ckpt.weights_finite(_poison(GPT(tiny_config().model)))
    with pytest.raises(ckpt.CheckpointError, match="not finite.*diverged"):
        _save(tmp_path, 6, model=_poison(GPT(tiny_config().model)), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000004"]  # nothing of step 6, both kept
    # the host copy the trainer hands over (a dict of weights) is checked the same way
    weights = ckpt.weights_state_dict(_poison(GPT(tiny_config().model)))
    assert ckpt.non_finite(weights) == ["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(ckpt.CheckpointError, match="c_fc"):
        ckpt.write_checkpoint(tmp_path, 8, weights, {"optimizer": {}}, {"step": 8}, [ckpt.rng_state()], {}, 1)
    assert ckpt.latest_checkpoint(tmp_path) == root / "step_000004"


def test_old_checkpoints_go_only_once_the_new_one_reads_back_intact(tmp_path, monkeypatch):
    """A torn write (the disk kept fewer bytes than were hashed): the new checkpoint is unpublished, the
    error raised, and the older ones stay although keep=1 would have pruned them."""
    for step in (2, 4):
        _save(tmp_path, step, keep=2)
    real_entry = ckpt._HashingWriter.entry

    def torn(self):
        entry = real_entry(self)
        if self.name == "optimizer.pt":
            written = Path(self.fh.name)
            written.write_bytes(written.read_bytes()[:-10])
        return entry

    monkeypatch.setattr(ckpt._HashingWriter, "entry", torn)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt"):
        _save(tmp_path, 6, keep=1)
    root = tmp_path / "checkpoints"
    assert [p.name for _, p in ckpt.local_checkpoints(tmp_path)] == ["step_000002", "step_000004"]
    assert not (root / "step_000006" / "manifest.json").exists()  # never the one a resume or a push picks
    monkeypatch.setattr(ckpt._HashingWriter, "entry", real_entry)
    _save(tmp_path, 8, keep=1)  # an intact one: now the rotation goes ahead
    assert [p.name for _, p in ckpt.local_checkpoints(tmp_path)] == ["step_000008"]


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "torch-wraps-it"])
def test_a_full_disk_leaves_no_half_checkpoint_and_the_nodes_marker(tmp_path, monkeypatch, wrapped):
    """ENOSPC mid-write: the older checkpoints stay, the half-written one is removed (its space back for the
    push), OUT gets model/deadman.py's marker (the run script then exits EXIT_DISK_FULL), and the error is one
    CheckpointError line."""
    import errno

    from model import deadman

    _save(tmp_path, 1)
    real_write = ckpt._HashingWriter.write

    def full(self, data):
        if self.name == "optimizer.pt":
            error = OSError(errno.ENOSPC, "No space left on device")
            if wrapped:
                try:
                    raise error
                except OSError:
                    raise RuntimeError("PytorchStreamWriter failed writing file data/0") from None
            raise error
        return real_write(self, data)

    monkeypatch.setattr(ckpt._HashingWriter, "write", full)
    with pytest.raises(ckpt.CheckpointError, match=r"step 2: not checkpointed, the disk is full"):
        _save(tmp_path, 2)
    assert [s for s, _ in ckpt.local_checkpoints(tmp_path)] == [1]
    assert not (tmp_path / "checkpoints" / "step_000002").exists()
    assert (tmp_path / deadman.DISK_FULL).read_text() == "checkpoint step 2\n"
