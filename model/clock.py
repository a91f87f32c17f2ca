"""The run's clock: seconds and GPU-seconds so far, over all its restarts and, on a node, all its attempts.

The cost and time caps (model/stop.py) and every metrics line's elapsed_seconds and cost_usd read it.
On a node it counts node time since the node came up (GPT2CLOUD_NODE_UP) plus the earlier attempts'
(the bucket's timeline and metrics, pulled before the trainer starts, and the attempts that never pushed
anything, which `status` counted from SkyPilot's records); off a node, this process's time plus the
resumed checkpoints'.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from gpt2cloud.store.layout import METRICS, TIMELINE
from model.metrics import cost_usd, node_seconds_before, parse_metrics, unseen_attempt_seconds
from model.stop import Usage


@dataclasses.dataclass
class Clock:
    """Seconds and GPU-seconds of the run so far, over all its restarts. On a node, cost and time limits
    count node time since it came up (and earlier attempts'), not only this loop."""

    t_start: float  # when this process started
    world: int
    node_up: float | None  # GPT2CLOUD_NODE_UP: when the node came up (None: not on a node)
    node_before: float = 0.0  # earlier attempts' node time (the bucket's timeline and metrics, and unseen attempts)
    elapsed_before: float = 0.0  # the resumed runs' seconds (their checkpoint's)
    gpu_seconds_before: float = 0.0  # the resumed runs' GPU-seconds, each at its own world size

    @classmethod
    def start(cls, out: Path, t_start: float, world: int) -> "Clock":
        """What the bucket's timeline and metrics say, read before anything truncates them; plus the attempts
        that never pushed anything there, which `status` counted from SkyPilot's records (pulled with them)."""
        node_up = float(os.environ["GPT2CLOUD_NODE_UP"]) if os.environ.get("GPT2CLOUD_NODE_UP") else None
        node_before = 0.0
        if node_up is not None:
            pulled = [r for name in (TIMELINE, METRICS) if (out / name).is_file()
                      for r in parse_metrics((out / name).read_text(encoding="utf-8"))]
            node_before = node_seconds_before(pulled, node_up) + unseen_attempt_seconds(out)
        return cls(t_start, world, node_up, node_before)

    def elapsed(self) -> float:
        if self.node_up is not None:
            return self.node_before + time.time() - self.node_up
        return self.elapsed_before + time.time() - self.t_start

    def gpu_seconds(self) -> float:
        """Each earlier run's at its own world size (from the checkpoint), this one's at ours. On a node:
        its node time (all attempts) x the GPUs it has."""
        if self.node_up is not None:
            return self.elapsed() * self.world
        return self.gpu_seconds_before + (time.time() - self.t_start) * self.world

    def cost(self, price_per_gpu_hour: float) -> float:
        return cost_usd(self.gpu_seconds(), 1, price_per_gpu_hour)

    def usage(self, since_checkpoint: float = 0.0, push_failing: float = 0.0, stop_requested: bool = False) -> Usage:
        return Usage(elapsed=self.elapsed(), gpu_seconds=self.gpu_seconds(), since_checkpoint=since_checkpoint,
                     push_failing=push_failing, stop_requested=stop_requested)
