"""Checkpoints: `OUT/checkpoints/step_NNNNNN/`, complete only once `manifest.json` exists.

A checkpoint holds everything an exact resume needs:
- model.safetensors   the raw (never compiled, never DDP-wrapped) module's weights, without the
                      duplicate lm_head.weight (tied to transformer.wte.weight)
- optimizer.pt        AdamW state (+ the fp16 GradScaler's), loaded with weights_only=True
- trainer_state.json  step, tokens seen, elapsed seconds, data-loader position, last loss, and the
                      trackers' run id (tracker_run_id: a resume logs to the same wandb/TensorBoard/
                      Trackio run, model/trackers.py)
- rng_rank{r}.pt      python, numpy, torch CPU and CUDA RNG state of every rank r
- manifest.json       written last, atomically: format, step, world size, recipe, config, and the
                      size and sha256 of every other file. No manifest: incomplete, ignored.

Non-finite weights are never written (a diverged run's), and older checkpoints are rotated out only
once a newer one is complete, finite and verified against its manifest on disk: a run that went bad
cannot push its good checkpoints out.

Public helpers other parts call: latest_checkpoint, verify_checkpoint, load_model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch

from gpt2cloud.store import StorageError, atomic_write  # the one part of gpt2cloud model/ imports
from gpt2cloud.store.layout import CHECKPOINTS, MANIFEST, STEP_DIR, local_checkpoints, step_dir
from gpt2cloud.store.transfer import check_files
from model import deadman, hf
from model.config import GPTConfig, TrainConfig
from model.gpt import GPT

FORMAT = "gpt2cloud-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
TIED = "lm_head.weight"  # same tensor as transformer.wte.weight; stored once


class CheckpointError(ValueError):
    """A missing, incomplete or corrupt checkpoint; the message names the file."""


# ---- finding and checking ----

def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{mpath}: missing; {path} is not a complete checkpoint")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{mpath}: not a {FORMAT} version {VERSION} manifest")
    return manifest


def read_manifest(path: str | Path) -> dict:
    """A checkpoint's manifest, checked for format but not against the files (verify_checkpoint does that)."""
    return _read_manifest(Path(path))


def _complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Of a run's OUT dir, or of its checkpoints dir itself."""
    return local_checkpoints(out_dir.parent if out_dir.name == CHECKPOINTS else out_dir)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under OUT/checkpoints (or a checkpoints dir itself), or None."""
    found = _complete_checkpoints(Path(out_dir))
    return found[-1][1] if found else None


def verify_checkpoint(path: str | Path, only: list[str] | None = None) -> dict:
    """Check every file (or those named in `only`) against the manifest's size and sha256.

    Returns the manifest; raises CheckpointError naming the file that is missing, truncated or corrupt.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    try:
        check_files(path, [f for f in manifest["files"] if only is None or f["name"] in only])
    except StorageError as e:
        raise CheckpointError(str(e)) from None
    return manifest


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir or HF-format dir as given, or the newest complete checkpoint of a run's OUT dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / MANIFEST).exists():
        return path
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}/{CHECKPOINTS}: no complete checkpoint (none has a {MANIFEST}) yet")
        return latest
    if hf.is_hf_dir(path):
        return path
    if STEP_DIR.match(path.name):
        raise CheckpointError(f"{path / MANIFEST}: missing; {path} is an incomplete checkpoint")
    raise CheckpointError(f"{path}: not a checkpoint ({MANIFEST}), a run directory (checkpoints/) "
                          "or an HF-format directory (config.json + model.safetensors or its shard index)")


# ---- saving ----

def rng_state() -> dict:
    """This process's RNG states in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def weights_finite(module: torch.nn.Module) -> bool:
    """Is every parameter finite? Checked on the device (one sync) before a checkpoint's host copy."""
    flags = [torch.isfinite(p.detach()).all() for p in module.parameters() if p.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True


def non_finite(weights: dict) -> list[str]:
    """The names of the tensors in a state dict that hold a NaN or an infinity."""
    return [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def weights_state_dict(raw_model: torch.nn.Module) -> dict:
    """The weights to store: the raw module's, without the tied duplicate, contiguous, on CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in raw_model.state_dict().items() if k != TIED}


class _HashingWriter(io.RawIOBase):
    """A file opened for writing that hashes what goes through it: the manifest's sha256 without reading
    the file back. close() fsyncs (the data must be on disk before the manifest vouches for it)."""

    def __init__(self, path: Path):
        self.name, self.fh, self.sha, self.size = path.name, open(path, "wb"), hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.fh.write(view)
        self.sha.update(view)
        self.size += len(view)
        return len(view)

    def entry(self) -> dict:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return {"name": self.name, "size": self.size, "sha256": self.sha.hexdigest()}


def to_host(obj):
    """A copy of a (nested) state with every tensor on the CPU: what a background write may take its
    time over while training goes on changing the originals."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes checkpoints on one background thread, so training goes on while the disk works.

    The caller takes a host copy first (to_host: the device-to-host copy is the only part on the
    critical path); one write at a time (a second waits for the first); wait() before the process ends.
    A write that fails is raised by the next wait() or submit().
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.done: list[dict] = []  # what finished: {"step", "path", "write_seconds"}, for the metrics

    def submit(self, step: int, write) -> None:
        self.wait()

        def run():
            t0 = time.perf_counter()
            try:
                path = write()
                self.done.append({"step": step, "path": str(path), "write_seconds": time.perf_counter() - t0})
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def pop_done(self) -> list[dict]:
        done, self.done = self.done, []
        return done


def write_checkpoint(out_dir: str | Path, step: int, raw_model, optimizer_state: dict,
                     trainer_state: dict, rng_states: list[dict], config: dict, keep: int) -> Path:
    """Write one checkpoint (rank 0 only), manifest last, then prune to the newest `keep`. `raw_model` is
    the module, or its weights already copied to the host (weights_state_dict). Non-finite weights are
    refused (CheckpointError) before anything is written; the older checkpoints go only once this one
    reads back intact. A full disk is a CheckpointError too, with the node's DISK_FULL marker left in OUT."""
    weights = raw_model if isinstance(raw_model, dict) else weights_state_dict(raw_model)
    bad = non_finite(weights)
    if bad:
        raise CheckpointError(f"step {step}: not checkpointed, its weights are not finite ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}); the run diverged")
    path = Path(out_dir) / CHECKPOINTS / step_dir(step)
    try:
        _write_files(path, step, weights, optimizer_state, trainer_state, rng_states, config)
    except (OSError, RuntimeError) as e:  # torch.save may wrap the OSError in a RuntimeError
        if not deadman.is_disk_full(e):
            raise
        # a full disk: no half checkpoint left behind (its space back for the metrics and the push), the
        # marker saying so (the run script ends the job with EXIT_DISK_FULL), and one line
        shutil.rmtree(path, ignore_errors=True)
        deadman.note_disk_full(out_dir, f"checkpoint step {step}")
        raise CheckpointError(f"step {step}: not checkpointed, the disk is full (No space left on device: {e}); "
                              "the task's disk_size is too small for its shards and keep_checkpoints") from None
    # read back from disk before anything older goes: a bad disk or a torn write must not cost the run
    # the checkpoints that are still good (a failure here leaves them all and raises)
    try:
        verify_checkpoint(path)
    except CheckpointError:
        (path / MANIFEST).unlink(missing_ok=True)  # unpublished: never the checkpoint a resume or a push picks
        raise
    prune_checkpoints(out_dir, keep)
    return path


def _write_files(path: Path, step: int, weights: dict, optimizer_state: dict, trainer_state: dict,
                 rng_states: list[dict], config: dict) -> None:
    """The checkpoint's files, each hashed as it is written, then its manifest (last: it publishes them)."""
    from safetensors.torch import save as safetensors_bytes

    if path.exists():
        shutil.rmtree(path)  # an incomplete attempt at this step (a killed run): start it over
    path.mkdir(parents=True)
    files = []

    def write(name: str, save) -> None:
        out = _HashingWriter(path / name)
        save(out)
        files.append(out.entry())

    write(WEIGHTS, lambda f: f.write(safetensors_bytes(weights, metadata={"format": "pt"})))
    write("optimizer.pt", lambda f: torch.save(optimizer_state, f))
    write("trainer_state.json", lambda f: f.write(json.dumps(trainer_state, indent=2).encode()))
    for r, s in enumerate(rng_states):
        write(f"rng_rank{r}.pt", lambda f, s=s: torch.save(s, f))
    files.sort(key=lambda e: e["name"])
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "world_size": len(rng_states),
                "recipe": config.get("recipe_name"), "config": config, "files": files}
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=2))


def prune_checkpoints(out_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and incomplete leftovers
    (a killed run's half-written directory) older than the newest complete one. write_checkpoint calls
    it only after its new checkpoint proved finite and intact."""
    root = Path(out_dir) / CHECKPOINTS
    complete = _complete_checkpoints(Path(out_dir))
    if not complete:
        return
    for _, d in complete[: -max(keep, 1)]:
        shutil.rmtree(d, ignore_errors=True)
    newest = complete[-1][0]
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and not (d / MANIFEST).exists() and int(m.group(1)) < newest:
            shutil.rmtree(d, ignore_errors=True)


# ---- loading ----

def _load_weights(path: Path, model: GPT, device) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path / WEIGHTS), device=str(device))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise CheckpointError(f"{path / WEIGHTS}: cannot be read ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) - {TIED} or unexpected:
        raise CheckpointError(
            f"{path / WEIGHTS}: does not match the model (missing {sorted(set(missing) - {TIED})}, "
            f"unexpected {sorted(unexpected)})"
        )


def load_model(path: str | Path, device="cpu", verify: bool = True) -> GPT:
    """A GPT from one of our checkpoint dirs (or a run's OUT dir: its newest), or an HF-format dir.

    HF-format means config.json + model.safetensors (or a shard index) and no manifest;
    model.hf.load_hf reads it.
    The weights of our checkpoints are verified against the manifest first (verify=False skips it).
    """
    path = resolve_checkpoint(path)
    if not (path / MANIFEST).exists():  # resolve_checkpoint found an HF-format dir
        return hf.load_hf(path).to(device)
    manifest = verify_checkpoint(path, only=[WEIGHTS]) if verify else _read_manifest(path)
    model = GPT(GPTConfig(**manifest["config"]["model"]))
    _load_weights(path, model, "cpu")
    return model.to(device)


def load_training_state(path: Path, raw_model: GPT, optimizer, scaler, rank: int, device) -> dict:
    """Restore weights, optimizer, scaler and this rank's RNG from a checkpoint (verify_checkpoint it first).

    Returns the trainer state plus `rng_restored` (False when the checkpoint came from fewer
    ranks than this run has: this rank then keeps its seeded RNG).
    """
    _load_weights(path, raw_model, device)
    opt = torch.load(path / "optimizer.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    if opt.get("scaler") and scaler is not None:
        scaler.load_state_dict(opt["scaler"])
    state = json.loads((path / "trainer_state.json").read_text())
    rng_file = path / f"rng_rank{rank}.pt"
    state["rng_restored"] = rng_file.exists()
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


# ---- resuming: the same run, or one line that says what differs ----

def data_identity(data_dir: str | Path) -> dict:
    """The training shard set, as a checkpoint records it: count, bytes and a digest of (name, size).

    Sizes come from the data's manifest when it has one (a download may still be bringing shards),
    else from the files; no shard is read, so it costs nothing on terabytes."""
    from model import datadir

    data_dir = Path(data_dir)
    listed = {f["name"]: int(f["size"]) for f in datadir.manifest_files(data_dir) or []}
    names = [n for n in listed if datadir.is_shard(n)] or [
        p.name for p in data_dir.iterdir() if p.suffix == datadir.SHARD_SUFFIX and p.is_file()]
    train, _ = datadir.split_names(sorted(names))
    pairs = sorted((n, listed.get(n) or (data_dir / n).stat().st_size) for n in train)
    digest = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]
    return {"shards": len(pairs), "bytes": sum(size for _, size in pairs), "digest": digest}


def _data_change(saved: dict | None, now: dict | None) -> list[str]:
    if not saved or not now or saved.get("digest") == now.get("digest"):
        return []  # an older checkpoint recorded no data identity: nothing to compare
    def shown(d):
        return f"{d['shards']} train shards, {d['bytes']:,} bytes ({d['digest']})"
    return [f"data: {shown(saved)} -> {shown(now)}"]


def resume_refusal(latest: Path, saved_config: dict, cfg: TrainConfig, saved_data: dict | None = None,
                   data: dict | None = None) -> str | None:
    """Why resuming the run of `latest` (a checkpoint, or a run's config.json) with `cfg` on `data`
    would be another run, in one line; None when it is the same run. The CLI asks before it writes
    anything, the trainer asks again (a cloud node, a plain torchrun)."""
    from model.config import resume_changes

    changes = resume_changes(saved_config, cfg) + _data_change(saved_data, data)
    if not changes:
        return None
    old_schedule = saved_config.get("schedule_steps") or saved_config["steps"]
    hint = (f" (it was trained on a {old_schedule}-step schedule: resume with --schedule-steps {old_schedule}; "
            "--steps only sets where the run stops)" if old_schedule != (cfg.schedule_steps or cfg.steps) else "")
    return (f"{latest} belongs to another run than these settings: {'; '.join(changes)}{hint}; resume it with "
            "its own settings, or use a new --out for a new run (a resume may change only the steps, the caps, "
            "--nproc and the eval and checkpoint cadence: docs/training.md#resume)")


def damaged_refusal(latest: Path, error: str) -> str:
    """One instruction for a newest checkpoint that fails its check: delete it, then rerun."""
    older = [p for _, p in local_checkpoints(latest.parent.parent) if p != latest]
    then = (f"rerun the same command to resume from {older[-1].name}" if older
            else "rerun to start the run over (it is the run's only checkpoint), or use a new --out")
    what = error.split("; re-create or re-fetch")[0]  # the store's generic advice: ours is more precise
    return f"{what}; delete {latest} and {then}"
