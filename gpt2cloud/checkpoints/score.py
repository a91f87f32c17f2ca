"""Score a checkpoint on this machine (`gpt2cloud eval`): load it, score HellaSwag, measure val loss.

The scoring itself lives in model/eval.py (the trainer calls it on the node); this module finds
the checkpoint and the data and turns their errors into one-line UserErrors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from gpt2cloud import home
from gpt2cloud.errors import UserError
from gpt2cloud.store.layout import MANIFEST


def pick_device(device: Optional[str] = None) -> str:
    """--device as torch understands it (cpu, cuda, cuda:1), checked against what this machine has."""
    import torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices; use cpu")
    if parsed.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu and cuda are supported")
    return device


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """(GPT, resolved path, step or None) from a checkpoint dir, a run's OUT dir or an HF dir."""
    from model.checkpoint import CheckpointError, load_model, resolve_checkpoint
    from model.hf import HFFormatError

    try:
        resolved = resolve_checkpoint(path)
        model = load_model(resolved, device)
    except (CheckpointError, HFFormatError) as e:
        raise UserError(str(e)) from None
    step = None
    manifest = resolved / MANIFEST
    if manifest.is_file():
        import json

        step = json.loads(manifest.read_text()).get("step")
    return model.eval(), resolved, step


def val_cache_dir(url: str) -> Path:
    return home.val_cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16]


def fetch_val_shards(url_or_dir: str) -> list[Path]:
    """Local validation shards: a dir or file as given, or the `*val*.bin` objects under a storage URL
    (s3://..., file://...), downloaded once into $GPT2CLOUD_HOME/cache/val/ and verified."""
    from model.eval import EvalDataError, val_shard_files

    if "://" not in url_or_dir:
        try:
            return val_shard_files(url_or_dir)
        except EvalDataError as e:
            raise UserError(str(e)) from None
    from gpt2cloud.store import open_store

    store = open_store(url_or_dir)
    keys = sorted(o.key for o in store.list() if o.key.endswith(".bin") and "val" in o.key.rsplit("/", 1)[-1])
    if not keys:
        raise UserError(f"{url_or_dir}: no validation shard (*val*.bin) there; give the data URL of "
                        "`gpt2cloud data prepare`/`upload`, or a local directory")
    cache = val_cache_dir(url_or_dir)
    cache.mkdir(parents=True, exist_ok=True)
    files = []
    for key in keys:
        local = cache / key.rsplit("/", 1)[-1]
        if not local.is_file():
            store.get_file(key, local, sha256=store.sha256(key))  # verified before it gets its name
        files.append(local)
    return files


def evaluate(checkpoint: str, hellaswag: Optional[str] = None, val: Optional[str] = None,
             limit: Optional[int] = None, val_steps: int = 20, val_batch: int = 8,
             device: Optional[str] = None) -> dict:
    """Scores of one checkpoint; HellaSwag on the first `limit` examples if given."""
    from model.eval import EvalDataError, hellaswag_scores, load_hellaswag, val_loss
    from model.shards import ShardError

    if not hellaswag and not val:
        raise UserError("nothing to evaluate: pass --hellaswag FILE (HellaSwag JSONL) and/or --val DIR_OR_URL")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be a positive number of examples")
    if val and (val_steps < 1 or val_batch < 1):
        raise UserError(f"--val-steps {val_steps} --val-batch {val_batch}: both must be positive")
    device = pick_device(device)
    model, resolved, step = load_checkpoint(checkpoint, device)
    result = {"checkpoint": str(resolved), "step": step, "params": model.num_params(), "device": device}
    try:
        if hellaswag:
            examples = load_hellaswag(hellaswag, limit=limit)
            result["hellaswag"] = {"file": str(hellaswag), **hellaswag_scores(model, examples, device)}
        if val:
            files = fetch_val_shards(val)
            T = model.config.block_size
            result["val"] = {"shards": [str(f) for f in files], "steps": val_steps, "batch": val_batch, "T": T,
                             "loss": val_loss(model, files, val_steps, val_batch, T, device)}
    except (EvalDataError, ShardError) as e:
        raise UserError(str(e)) from None
    return result
