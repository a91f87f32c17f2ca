"""`gpt2cloud export --hf`: a checkpoint as a directory transformers loads with `from_pretrained`.

    config.json, model.safetensors        model/hf.py save_hf (GPT2LMHeadModel layout)
    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                                          gpt2cloud/checkpoints/hf_tokenizer.py (from our bundled GPT-2 ranks)
    generation_config.json                <|endoftext|> as BOS/EOS, so generate() stops there
    gpt2cloud_export.json                 the marker: which checkpoint, and the files above

The marker is written first: a directory holding it is an export of ours, which a later export may
replace (an interrupted one included). Any other directory with files in it, and a run's own
directory, is refused before anything is written (docs/ownership.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from gpt2cloud.errors import UserError
from gpt2cloud.store import atomic_write
from gpt2cloud.store.base import TMP_MARK
from gpt2cloud.store.layout import CHECKPOINTS, MANIFEST, METRICS

EXPORT_MARKER = "gpt2cloud_export.json"
MARKER_FORMAT = "gpt2cloud-hf-export"
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
                "tokenizer_config.json", "special_tokens_map.json", EXPORT_MARKER)


def _ours(name: str) -> bool:
    """A file an export writes, or the temporary name it writes one under (an interrupted export)."""
    return name in EXPORT_FILES or name == "model.safetensors.tmp" or TMP_MARK in name


def _read_marker(out: Path) -> dict | None:
    try:
        marker = json.loads((out / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def check_export_dir(out: Path) -> None:
    """--hf is new, empty, or an earlier export of ours holding nothing else; else one line."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--hf {out}: is a file; give a directory (new or empty, or an earlier export's)")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not names:
        return
    ways = f"export into a new or empty directory, e.g. --hf {out.name}-hf"
    if (out / MANIFEST).exists():
        raise UserError(f"--hf {out}: is one of our checkpoints; {ways}")
    run_files = [n for n in (METRICS, CHECKPOINTS) if n in names]
    if run_files:
        raise UserError(f"--hf {out}: is a run directory ({', '.join(run_files)}), whose config.json is the "
                        f"trainer's; {ways}")
    if _read_marker(out) is None:
        what = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(f"--hf {out}: holds files export did not write ({what}); {ways}")
    foreign = [n for n in names if not _ours(n)]
    if foreign:
        raise UserError(f"--hf {out}: an earlier export, but also holds files it did not write "
                        f"({', '.join(foreign[:3])}); move them away, or {ways}")


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> dict:
    from gpt2cloud.checkpoints.score import load_checkpoint
    from gpt2cloud.checkpoints.hf_tokenizer import write_tokenizer_files
    from model.hf import CONFIG_FILE, WEIGHTS_FILE, save_hf
    from model.tokenizer import EOT_TOKEN, VOCAB_SIZE

    out = Path(out_dir)
    check_export_dir(out)
    model, resolved, step = load_checkpoint(checkpoint, "cpu")
    if model.config.vocab_size != VOCAB_SIZE:
        raise UserError(f"{resolved}: vocabulary {model.config.vocab_size}, not GPT-2's {VOCAB_SIZE}; "
                        "the GPT-2 tokenizer files would not fit this model")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--hf {out}: cannot be created ({e.strerror}); give another directory") from None
    marker = {"format": MARKER_FORMAT, "version": 1, "checkpoint": str(resolved.resolve()), "step": step,
              "files": list(EXPORT_FILES[:-1]), "complete": False}
    atomic_write(out / EXPORT_MARKER, json.dumps(marker, indent=2) + "\n")  # first: the directory is ours
    save_hf(model, out)
    written = write_tokenizer_files(out, model_max_length=model.config.block_size)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}, indent=2) + "\n")
    atomic_write(out / EXPORT_MARKER, json.dumps({**marker, "complete": True}, indent=2) + "\n")
    files = sorted(p.name for p in [out / CONFIG_FILE, out / WEIGHTS_FILE,
                                    out / "generation_config.json", *written])
    return {"checkpoint": str(resolved), "step": step, "dir": str(out), "files": files,
            "params": model.num_params()}
