"""The GPT-2 byte-pair tokenizer, built offline from the ranks file this package ships.

tiktoken.get_encoding("gpt2") downloads its merges on first use; a GPU node or a CI machine
without internet must still tokenize, so we build the same Encoding from bundled bytes.
Both `model/` (sampling, eval) and `gpt2cloud/` (data prepare) use this one module.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

EOT_TOKEN = 50256  # <|endoftext|>: separates documents, and starts every one of them
VOCAB_SIZE = 50257
RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# The r50k_base / gpt2 pre-tokenization pattern (tiktoken_ext.openai_public).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerError(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def get_encoding():
    """Return the GPT-2 tiktoken Encoding (cached per process)."""
    import tiktoken

    data = RANKS_PATH.read_bytes()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise TokenizerError(f"{RANKS_PATH} is corrupt (sha256 mismatch); reinstall gpt2cloud")
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe: that one copies even a local file into
    # its cache ($TIKTOKEN_CACHE_DIR, creating the directory; /tmp/data-gym-cache by default) and fails
    # when that directory cannot be written.
    pairs = (line.split() for line in data.splitlines() if line)
    ranks = {base64.b64decode(token): int(rank) for token, rank in pairs}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
    )


def encode(text: str) -> list[int]:
    """Encode ordinary text (special-token strings in the text are treated as plain text)."""
    return get_encoding().encode_ordinary(text)


def decode(tokens) -> str:
    return get_encoding().decode([int(t) for t in tokens if int(t) < VOCAB_SIZE])
