"""`gpt2cloud export --hf`: a checkpoint as a directory transformers loads with `from_pretrained`.

    config.json, model.safetensors        model/hf.py save_hf (GPT2LMHeadModel layout)
    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
                                          gpt2cloud/checkpoints/hf_tokenizer.py (from our bundled GPT-2 ranks)
    generation_config.json                <|endoftext|> as BOS/EOS, so generate() stops there
"""

from __future__ import annotations

import json
from pathlib import Path

from gpt2cloud.errors import UserError
from gpt2cloud.store.layout import MANIFEST


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> dict:
    from gpt2cloud.checkpoints.score import load_checkpoint
    from gpt2cloud.checkpoints.hf_tokenizer import write_tokenizer_files
    from model.hf import CONFIG_FILE, WEIGHTS_FILE, save_hf
    from model.tokenizer import EOT_TOKEN, VOCAB_SIZE

    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise UserError(f"{out}: is one of our checkpoints; export into a new directory")
    model, resolved, step = load_checkpoint(checkpoint, "cpu")
    if model.config.vocab_size != VOCAB_SIZE:
        raise UserError(f"{resolved}: vocabulary {model.config.vocab_size}, not GPT-2's {VOCAB_SIZE}; "
                        "the GPT-2 tokenizer files would not fit this model")
    save_hf(model, out)
    written = write_tokenizer_files(out, model_max_length=model.config.block_size)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}, indent=2) + "\n")
    files = sorted(p.name for p in [out / CONFIG_FILE, out / WEIGHTS_FILE,
                                    out / "generation_config.json", *written])
    return {"checkpoint": str(resolved), "step": step, "dir": str(out), "files": files,
            "params": model.num_params()}
