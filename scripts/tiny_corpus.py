#!/usr/bin/env python3
"""Write a small, deterministic English corpus (JSONL, a `text` field per line) for the local demo and tests.

Simple sentences from a fixed grammar: small enough to tokenize in a second, regular enough that
gpt2-tiny learns visibly in a few dozen CPU steps.

    python scripts/tiny_corpus.py OUT.jsonl [--docs 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SUBJECTS = ["The cat", "A small dog", "The old man", "My friend", "The teacher", "A young girl", "The farmer",
            "Our neighbour", "The bird", "A language model"]
VERBS = ["sees", "likes", "finds", "carries", "watches", "remembers", "draws", "follows", "reads about", "talks to"]
OBJECTS = ["the red ball", "a green tree", "the quiet river", "an old book", "the bright moon", "a wooden boat",
           "the busy market", "a warm loaf of bread", "the tall mountain", "a clever fox"]
PLACES = ["in the morning", "after lunch", "near the house", "by the sea", "in the garden", "on a rainy day",
          "at the station", "before dinner", "under the bridge", "in the evening"]
OPENINGS = ["Hello, I'm a language model, and", "Once upon a time,", "Every day,", "In a small village,",
            "Yesterday,"]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
    return s


def document(rng: random.Random) -> str:
    first = sentence(rng)
    first = f"{rng.choice(OPENINGS)} {first[0].lower()}{first[1:]}"
    return " ".join([first] + [sentence(rng) for _ in range(rng.randint(4, 9))])


def write_corpus(path: str | Path, docs: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": document(rng)}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--docs", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    path = write_corpus(a.out, a.docs, a.seed)
    print(f"wrote {a.docs} documents to {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
