"""Evaluation that runs anywhere the model runs (the CLI locally, the trainer on the node).

- HellaSwag, completion style (as GPT-2's and build-nanogpt's evaluation): for each of the 4
  endings, the log-probability of the ending's tokens given the context. `acc` picks the ending
  with the highest sum, `acc_norm` the highest mean per token (so long endings are not penalised).
  OpenAI's GPT-2 124M scores acc_norm 0.2955 on the 10,042 validation examples, 1558M 0.4893.
- Validation loss on llm.c `.bin` token shards.

Logits are sliced to the real vocabulary (50257) before any softmax: the padded rows of the
embedding are never trained as targets (or are zero in an imported HF model), and their logits
must not take probability mass from real tokens.

Both functions can be split over DDP ranks: each rank takes its stride, and the caller all-reduces
the returned counts (HellaSwag) or averages the returned loss (val loss).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F

from model.hf import unwrap
from model.tokenizer import EOT_TOKEN, encode

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


class EvalDataError(ValueError):
    """An evaluation file that cannot be used; the message names the file, line and problem."""


def _device_of(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _autocast(device):
    """bf16 autocast on CUDA as in training; plain fp32 elsewhere."""
    device = _device_of(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- HellaSwag

def load_hellaswag(path: str | Path, limit: int | None = None) -> list[dict]:
    """Examples from the HellaSwag JSONL format (one object a line: `ctx`, `endings`, `label`)."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: HellaSwag file not found (get hellaswag_val.jsonl from {HELLASWAG_VAL_URL})")
    examples = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as e:
        raise EvalDataError(f"{path}: not a readable UTF-8 text file ({type(e).__name__}); give HellaSwag's JSONL "
                            f"(hellaswag_val.jsonl from {HELLASWAG_VAL_URL})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
            ctx, endings, label = row["ctx"], row["endings"], int(row["label"])
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{where}: not JSON ({e.msg})") from None
        except (KeyError, TypeError, ValueError):
            raise EvalDataError(f"{where}: expected an object with ctx, endings and an integer label") from None
        if (not isinstance(endings, list) or len(endings) < 2 or not 0 <= label < len(endings)
                or not all(isinstance(e, str) and e.strip() for e in endings)):
            raise EvalDataError(f"{where}: endings must be a list of at least 2 non-empty strings "
                                "and label an index into it")
        examples.append({"ctx": ctx, "endings": endings, "label": label})
    if not examples:
        raise EvalDataError(f"{path}: no examples")
    return examples


def render_example(example: dict, block_size: int):
    """Tokens (n_endings, L), ending mask (n_endings, L) and label for one example.

    Each row is context + " " + ending, right-padded; the mask marks the ending's tokens. If a row is
    longer than the model's context, the oldest context tokens are dropped (never the ending).
    """
    # An empty context still needs one token to predict the ending's first token from.
    ctx = encode(example["ctx"]) or [EOT_TOKEN]
    rows, masks = [], []
    for ending in example["endings"]:
        # The space belongs to the ending, as GPT-2 tokenizes running text.
        end = encode(" " + ending)[: block_size - 1]
        c = ctx[-(block_size - len(end)):]
        rows.append(c + end)
        masks.append([0] * len(c) + [1] * len(end))
    width = max(len(r) for r in rows)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m)
    return tokens, mask, example["label"]


@torch.no_grad()
def ending_logprobs(model, example: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ending: (sum of log-probs of its tokens, number of its tokens)."""
    config = unwrap(model).config
    tokens, mask, _ = rendered(example, config.block_size)
    tokens, mask = tokens.to(device), mask.to(device)
    with _autocast(device):
        logits, _ = model(tokens)
    logits = logits[:, :-1, : config.vocab_size].float()
    targets, target_mask = tokens[:, 1:], mask[:, 1:]
    logp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (n_endings, L-1)
    return (logp * target_mask).sum(dim=1).cpu(), target_mask.sum(dim=1).cpu()


def rendered(example: dict, block_size: int):
    """render_example's result, tokenized once per example and block size (kept in the example dict)."""
    cached = example.get("_rendered")
    if cached is None or cached[0] != block_size:
        cached = example["_rendered"] = (block_size, *render_example(example, block_size))
    return cached[1:]


HELLASWAG_BATCH = 16  # examples per forward (x 4 endings each)


@torch.no_grad()
def hellaswag_counts(model, examples: list[dict], device, rank: int = 0, world_size: int = 1,
                     batch: int = HELLASWAG_BATCH) -> torch.Tensor:
    """(correct, correct_norm, n) of this rank's stride of examples as a long tensor on `device`.

    `batch` examples go through the model in one forward: their endings' rows, right-padded to the
    longest. Causal attention makes a row's logits independent of the padding after it, so the scores
    are those of scoring the examples one by one (ending_logprobs). The counts stay on the device:
    no host sync per example.
    """
    config = unwrap(model).config
    device = _device_of(device)
    counts = torch.zeros(3, dtype=torch.long, device=device)
    mine = examples[rank::world_size]
    for i in range(0, len(mine), batch):
        group = [rendered(e, config.block_size) for e in mine[i: i + batch]]
        width = max(t.size(1) for t, _, _ in group)
        tokens = torch.cat([F.pad(t, (0, width - t.size(1))) for t, _, _ in group]).to(device, non_blocking=True)
        mask = torch.cat([F.pad(m, (0, width - m.size(1))) for _, m, _ in group]).to(device, non_blocking=True)
        with _autocast(device):
            logits, _ = model(tokens)
        logits = logits[:, :-1, : config.vocab_size].float()
        targets, target_mask = tokens[:, 1:], mask[:, 1:]
        logp = -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        del logits
        sums, lengths = (logp * target_mask).sum(dim=1), target_mask.sum(dim=1)
        labels = torch.tensor([label for _, _, label in group], device=device)
        sizes = [t.size(0) for t, _, _ in group]
        if len(set(sizes)) == 1:  # the usual case: every example has 4 endings
            s, n = sums.view(len(group), -1), lengths.view(len(group), -1)
            counts[0] += (s.argmax(dim=1) == labels).sum()
            counts[1] += ((s / n).argmax(dim=1) == labels).sum()
        else:
            for j, (s, n) in enumerate(zip(sums.split(sizes), lengths.split(sizes))):
                counts[0] += (s.argmax() == labels[j]).long()
                counts[1] += ((s / n).argmax() == labels[j]).long()
        counts[2] += len(group)
    return counts


def hellaswag_scores(model, examples: list[dict], device, rank: int = 0, world_size: int = 1,
                     batch: int = HELLASWAG_BATCH) -> dict:
    """Score this rank's stride of examples (i % world_size == rank), `batch` examples per forward.

    Returns acc, acc_norm and n for this rank, plus `correct` and `correct_norm` counts: with DDP,
    all-reduce (sum) correct, correct_norm and n, then divide.
    """
    correct, correct_norm, n = hellaswag_counts(model, examples, device, rank, world_size, batch).tolist()
    return {
        "acc": correct / n if n else math.nan,
        "acc_norm": correct_norm / n if n else math.nan,
        "n": n,
        "correct": correct,
        "correct_norm": correct_norm,
    }


# ---------------------------------------------------------------- validation loss

def val_shard_files(shard_dir_or_files) -> list[Path]:
    """A directory's validation shards (names containing `val`, llm.c's convention), or the given files."""
    if isinstance(shard_dir_or_files, (str, Path)) and Path(shard_dir_or_files).is_dir():
        d = Path(shard_dir_or_files)
        files = sorted(p for p in d.glob("*.bin") if "val" in p.name)
        if not files:
            raise EvalDataError(f"{d}: no validation shard (*val*.bin) in this directory")
        return files
    items = [shard_dir_or_files] if isinstance(shard_dir_or_files, (str, Path)) else list(shard_dir_or_files)
    files = [Path(p) for p in items]
    for p in files:
        if not p.is_file():
            raise EvalDataError(f"{p}: validation shard not found")
    return files


@torch.no_grad()
def val_loss(model, shard_dir_or_files, steps: int, batch: int, T: int, device,
             rank: int = 0, world_size: int = 1) -> float:
    """Mean cross-entropy over `steps` batches of `batch` x `T` tokens read in order from the shards.

    The batches come from the trainer's TokenLoader (model/data.py): rank r reads batches
    r, r + world_size, ...; average the result over ranks. Stops early, averaging what it read, if
    the shards run out (the loader would wrap around and read them again).
    """
    from model.data import TokenLoader
    from model.shards import read_header

    config = unwrap(model).config
    loader = TokenLoader(val_shard_files(shard_dir_or_files), batch, T, rank, world_size, accum=1,
                         log=lambda *a: None)
    available = sum((read_header(p) - 1) // loader.step_tokens for p in loader.shards)
    steps = min(steps, available)
    total = 0.0
    for _ in range(steps):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        with _autocast(device):
            logits, _ = model(x)
        logits = logits[..., : config.vocab_size].float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
    return total / steps


# ---- during training: every rank scores its share, one all-reduce ----

def val_loader_steps(val_steps: int, world: int) -> int:
    """Micro-batches each rank reads so that the ranks together cover the first val_steps batches."""
    return max(1, -(-val_steps // world))


@torch.no_grad()
def evaluate(model, loader, world, amp, device, ddp, val_steps=None) -> float:
    """Mean loss over the val shard's first `val_steps` micro-batches, whatever the number of ranks.

    The loader rewinds first, so every evaluation reads the same batches. Micro-step k of rank r reads
    batch k * world + r; batches at or past val_steps (the last round when world does not divide it)
    are read but weigh nothing, so 1, 2 or 3 ranks average exactly the same val_steps batches.
    """
    n = val_steps if val_steps else loader.accum * world
    loader.rewind()
    model.eval()
    total = torch.zeros((), device=device)
    for k in range(loader.accum):
        x, y = loader.next_batch()
        if k * world + loader.rank >= n:
            continue
        with amp():
            _, loss = model(x.to(device), y.to(device))
        total += loss.detach() / n
    model.train()
    if ddp:
        dist.all_reduce(total)  # each rank holds its share of the mean: the sum is the mean
    return total.item()


@torch.no_grad()
def hellaswag_eval(model, examples, device, rank, world, ddp) -> dict:
    """HellaSwag acc / acc_norm over all examples, each rank scoring its stride (model/eval.py)."""
    model.eval()
    counts = hellaswag_counts(model, examples, device, rank, world)  # on the device: one sync, below
    model.train()
    if ddp:
        dist.all_reduce(counts)
    correct, correct_norm, n = counts.tolist()
    return {"hellaswag_acc_norm": correct_norm / n, "hellaswag_acc": correct / n, "hellaswag_n": n}
