"""What a run reports: `OUT/metrics.jsonl` (one JSON object per line), the console line, FLOPs and cost."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from model.config import GPTConfig


def flops_per_token(model: GPTConfig, n_params: int) -> int:
    """Training FLOPs per token, 6N + 12*L*d*T (nanoGPT/PaLM convention; N at the real vocabulary).

    The same formula as gpt2cloud/estimate.py, which a node cannot import (pydantic); here N is the
    built model's count, so the MFU the trainer logs and the one `gpt2cloud estimate` predicts agree.
    """
    return 6 * n_params + 12 * model.n_layer * model.n_embd * model.block_size


def mfu(tokens_per_second: float, flops_token: int, peak_flops_per_gpu: float, world_size: int):
    """Model FLOPs utilisation, or None when the peak is unknown (0)."""
    if peak_flops_per_gpu <= 0:
        return None
    return tokens_per_second * flops_token / (peak_flops_per_gpu * world_size)


def cost_usd(elapsed_seconds: float, world_size: int, price_per_gpu_hour: float) -> float:
    return elapsed_seconds / 3600 * world_size * price_per_gpu_hour


class MetricsLog:
    """Appends one JSON object per line to OUT/metrics.jsonl, flushed at once (rank 0 only).

    Readers (`gpt2cloud status`, plots) can tail the file while the run is going.
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.f = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.f is not None:
            # inf/nan (an fp16 overflow step, a diverged run) as null: strict JSON readers reject them
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            self.f = None


def truncate_after(path: str | Path, step: int) -> None:
    """Drop lines about steps after `step` (a killed run logged them; the resumed run redoes them).

    Each step then appears once in the file, and its loss is the one the finished run has.
    """
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if record.get("step") is None or record["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def console_line(step: int, steps: int, loss: float, lr: float, norm: float, tok_s: float, dt: float) -> str:
    return (f"step {step}/{steps} | loss {loss:.4f} | lr {lr:.1e} | norm {norm:.2f} | "
            f"{tok_s:,.0f} tok/s | {dt:.2f} s")
