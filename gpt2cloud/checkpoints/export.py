"""`gpt2cloud export --hf`: a checkpoint as a directory transformers loads with `from_pretrained`.

    config.json, model.safetensors        model/hf.py save_hf (GPT2LMHeadModel layout)
    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                                          gpt2cloud/checkpoints/hf_tokenizer.py (from our bundled GPT-2 ranks)
    generation_config.json                <|endoftext|> as BOS/EOS, so generate() stops there
    README.md, training_curves.png        the model card and its plot: written by the `card` the caller
                                          passes (gpt2cloud/runs/card.py, which knows the run's metrics)
    gpt2cloud_export.json                 the marker: which checkpoint, and the files above

The marker is written first: a directory holding it is an export of ours, which a later export may
replace (an interrupted one included). Any other directory with files in it, and a run's own
directory, is refused before anything is written (docs/ownership.md). A README.md is ours only while
it holds CARD_MARKER: a card the user rewrote is theirs, and refused like any other file of theirs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from gpt2cloud.errors import UserError
from gpt2cloud.store import atomic_write
from gpt2cloud.store.base import TMP_MARK
from gpt2cloud.store.layout import CHECKPOINTS, MANIFEST, METRICS

EXPORT_MARKER = "gpt2cloud_export.json"
MARKER_FORMAT = "gpt2cloud-hf-export"
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "vocab.json", "merges.txt",
                "tokenizer_config.json", "special_tokens_map.json", EXPORT_MARKER)
CARD_FILE = "README.md"  # the model card: the Hub shows it as the repo's page
PLOT_FILE = "training_curves.png"  # the card's plot; absent when the checkpoint has no run metrics beside it
CARD_FILES = (CARD_FILE, PLOT_FILE)
# The card's identity, on its first line after the front matter: a README.md (here or in a Hub repo)
# holding it was written by gpt2cloud; one without it belongs to someone else and is never replaced.
CARD_MARKER = "<!-- gpt2cloud model card: written by `gpt2cloud export`, replaced by the next export -->"

# card(out, result) -> names of the files it wrote into out
CardWriter = Callable[[Path, dict], list]


def _ours(name: str) -> bool:
    """A file an export writes, or the temporary name it writes one under (an interrupted export)."""
    return name in EXPORT_FILES or name in CARD_FILES or name == "model.safetensors.tmp" or TMP_MARK in name


def is_our_card(text: str) -> bool:
    return CARD_MARKER in text


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
    if CARD_FILE in names and not _card_ours(out / CARD_FILE):
        foreign.insert(0, f"{CARD_FILE} without gpt2cloud's card marker")
    if foreign:
        raise UserError(f"--hf {out}: an earlier export, but also holds files it did not write "
                        f"({', '.join(foreign[:3])}); move them away, or {ways}")


def _card_ours(path: Path) -> bool:
    try:
        return is_our_card(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False


def exported_files(out_dir: str | Path) -> list[str]:
    """The files a complete export of ours in out_dir consists of (its marker included), for a push."""
    out = Path(out_dir)
    marker = _read_marker(out)
    if marker is None or not marker.get("complete"):
        raise UserError(f"{out}: not a complete export (no finished {EXPORT_MARKER}); run `gpt2cloud export` "
                        "into it again")
    names = [*marker.get("files", []), EXPORT_MARKER]
    missing = [n for n in names if not (out / n).is_file()]
    if missing:
        raise UserError(f"{out}: the export lacks {', '.join(missing[:3])}; run `gpt2cloud export` into it again")
    return names


def export_hf(checkpoint: str | Path, out_dir: str | Path, card: Optional[CardWriter] = None) -> dict:
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
    files = sorted(p.name for p in [out / CONFIG_FILE, out / WEIGHTS_FILE,
                                    out / "generation_config.json", *written])
    c = model.config
    result = {"checkpoint": str(resolved), "step": step, "dir": str(out), "files": files,
              "params": model.num_params(),
              "model": {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size}}
    for name in CARD_FILES:  # an earlier export's card and plot: this export's card may have no plot
        (out / name).unlink(missing_ok=True)
    if card is not None:
        result["files"] = sorted([*files, *card(out, result)])
    atomic_write(out / EXPORT_MARKER, json.dumps({**marker, "files": result["files"], "complete": True},
                                                  indent=2) + "\n")
    return result
