"""GPT-2's tokenizer files for Hugging Face (vocab.json, merges.txt, ...), built from our tiktoken ranks.

tiktoken stores the BPE as `token bytes -> rank`; Hugging Face's GPT2Tokenizer wants:
- vocab.json: token -> id, where each token's bytes are spelled with GPT-2's byte-to-unicode table
  (every byte maps to a printable character, e.g. the space byte to "Ġ");
- merges.txt: the merge rules in priority order. Rank r (>= 256) was created by merging two
  lower-ranked tokens; which two is recovered by running BPE on its bytes with only the merges
  below r, which must leave exactly two parts.
No transformers needed to write them (tests check that transformers reads them).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

EOT = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _spell(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of `token` using only merges ranked below max_rank (lowest rank merges first)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i: best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """(vocab.json contents, merges.txt lines) from tiktoken ranks; EOT gets the next id."""
    vocab = {_spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue  # the 256 single bytes are the alphabet, not merges
        parts = _merge_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"rank {rank} ({token!r}) is not a merge of two lower-ranked tokens")
        merges.append(f"{_spell(parts[0])} {_spell(parts[1])}")
    vocab[EOT] = len(ranks)
    return vocab, merges


def write_tokenizer_files(out_dir: str | Path, model_max_length: int = 1024) -> list[Path]:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into out_dir."""
    from model.tokenizer import EOT_TOKEN, get_encoding

    enc = get_encoding()
    vocab, merges = vocab_and_merges(enc._mergeable_ranks)
    assert vocab[EOT] == EOT_TOKEN
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": model_max_length,
            "add_prefix_space": False,  # GPT-2 encodes "Hello" and " Hello" differently; keep that
            "add_bos_token": False,
            "errors": "replace",
            **special,
        }, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    written = []
    for name, text in files.items():
        (out / name).write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        written.append(out / name)
    return written
