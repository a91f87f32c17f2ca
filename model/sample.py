"""Text from a GPT: used by the trainer's periodic samples and by `gpt2cloud sample`.

    python -m model.sample OUT_OR_CHECKPOINT --prompt "Hello" [--max-new-tokens 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

from model import tokenizer
from model.gpt import GPT


def generate_text(model: GPT, prompt: str, max_new_tokens: int = 32, temperature: float = 1.0,
                  top_k: int | None = 50, num_samples: int = 1, seed: int | None = None,
                  device=None, autocast_dtype: torch.dtype | None = None) -> list[str]:
    """`num_samples` continuations of `prompt` (prompt included), decoded with the GPT-2 tokenizer.

    Uses its own torch.Generator, so sampling never disturbs the training RNG streams (and a
    resumed run's samples match an uninterrupted run's).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids = [tokenizer.EOT_TOKEN] + tokenizer.encode(prompt)  # documents start with <|endoftext|>
    if max(ids) >= model.config.vocab_size:
        raise ValueError(
            f"this model's vocabulary has {model.config.vocab_size} tokens, too few for GPT-2 text "
            f"(token {max(ids)} in the prompt); only full-vocabulary models can be sampled"
        )
    ids = ids[-model.config.block_size:]
    idx = torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "little"))
    ctx = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    with ctx:
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    model.train(was_training)
    return [tokenizer.decode(row[1:].tolist()) for row in out]  # drop the leading <|endoftext|>


def main(argv=None):
    from model.checkpoint import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(a.checkpoint, device=device)
    for text in generate_text(model, a.prompt, a.max_new_tokens, a.temperature, a.top_k, a.num_samples, a.seed):
        print(text)
        print("-" * 40)


if __name__ == "__main__":
    main()
