"""When the trainer stops before its last step: the stop policy, decided from plain numbers.

Before a step the trainer asks whether one more loop iteration (step, evals, checkpoint) could take the
run past a cap: the cost cap (max_cost_usd at price_per_gpu_hour, over every rank's GPU-seconds) or the
time cap (max_hours of wall time). It predicts the next iteration from the slowest recent one, with a 50%
margin for a busier host; a resumed run starts from the slowest its checkpoint saw, else a run stopped at
its cap would take one step past it when resumed.

Each check waits for the device (the time is only known then), so the policy also says how many steps
surely fit before the next check: about CHECK_SECONDS of them, never more than the caps allow.

No torch here: the trainer feeds it seconds and a unit test can drive it with plain numbers. A new rule
(a signal asking for a clean stop, a loss that diverged) is a class with `reason`, `passed()` and
`seconds_left()`, one entry in STOP_REASONS, and its line in StopPolicy.from_config.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from model.metrics import cost_usd

CHECK_SECONDS = 2.0  # the budget/time check (a host-device sync) runs about this often, or every step if slower
MARGIN = 1.5  # the next iteration may take this many times the slowest recent one
RECENT = 10  # loop iterations the prediction looks back over

# Every reason a rule may stop for, in a fixed order: rank 0 decides and sends the others its index
# (a number fits the broadcast tensor). When two rules pass at once, the earlier rule wins.
STOP_REASONS = ("budget", "time")


def steps_that_fit(step_seconds: float, *seconds_left: float) -> int:
    """How many more steps of `step_seconds` (the slowest recent, with its margin) fit in every one of
    `seconds_left`, and no more than CHECK_SECONDS of them: the steps before the budget check must run
    again. 1 while no step time is known yet (check before every step until one is)."""
    if step_seconds <= 0:
        return 1
    fit = max(1, int(CHECK_SECONDS / step_seconds))
    for left in seconds_left:
        if left != math.inf:
            fit = min(fit, int(max(0.0, left) / step_seconds * (1 - 1e-9)))
    return max(0, fit)


@dataclass(frozen=True)
class Usage:
    """What the run has used at a check, over all its restarts (node time on a node)."""

    elapsed: float  # wall seconds
    gpu_seconds: float  # GPU-seconds: each earlier run's at its own world size, this one's at its own


@dataclass(frozen=True)
class Decision:
    stop: str | None  # a reason of STOP_REASONS; None: go on
    fit: int  # steps that surely fit before the next check (0: stop now)

    def encode(self) -> list[int]:
        """[reason's index + 1 (0: go on), fit]: what rank 0 broadcasts."""
        return [0 if self.stop is None else STOP_REASONS.index(self.stop) + 1, self.fit]

    @classmethod
    def decode(cls, code: list[int]) -> "Decision":
        return cls(None if code[0] == 0 else STOP_REASONS[code[0] - 1], code[1])


class CostCap:
    """max_cost_usd: every rank's GPU-seconds at price_per_gpu_hour."""

    reason = "budget"

    def __init__(self, max_cost_usd: float, price_per_gpu_hour: float, world: int):
        self.max_cost_usd, self.price_per_gpu_hour, self.world = max_cost_usd, price_per_gpu_hour, world

    def passed(self, usage: Usage, margin: float) -> bool:
        """Would `margin` more seconds on every rank take the cost past the cap?"""
        return cost_usd(usage.gpu_seconds + margin * self.world, 1, self.price_per_gpu_hour) > self.max_cost_usd

    def seconds_left(self, usage: Usage) -> float:
        """Wall seconds of all ranks before the cap."""
        return self.max_cost_usd / self.price_per_gpu_hour * 3600 / self.world - usage.gpu_seconds / self.world


class TimeCap:
    """max_hours of wall time (over all restarts; node time on a node)."""

    reason = "time"

    def __init__(self, max_hours: float):
        self.max_hours = max_hours

    def passed(self, usage: Usage, margin: float) -> bool:
        return usage.elapsed + margin > self.max_hours * 3600

    def seconds_left(self, usage: Usage) -> float:
        return self.max_hours * 3600 - usage.elapsed


class StopPolicy:
    """The rules in force, the recent loop iterations' seconds, and the step of the next check."""

    def __init__(self, rules: list, slowest_before: float = 0.0):
        self.rules = list(rules)
        # a resumed run's slowest recent iteration (its checkpoint's) counts until ten newer ones push it out
        self.recent = collections.deque([slowest_before] if slowest_before else [], maxlen=RECENT)
        self.lap_start: float | None = None
        self.next_check = 0  # the check runs before this step (then every few steps: Decision.fit)

    @classmethod
    def from_config(cls, cfg, world: int, slowest_before: float = 0.0) -> "StopPolicy":
        """The caps a TrainConfig sets: a budget needs both max_cost_usd and a price; 0 turns a cap off."""
        rules = []
        if cfg.max_cost_usd > 0 and cfg.price_per_gpu_hour > 0:
            rules.append(CostCap(cfg.max_cost_usd, cfg.price_per_gpu_hour, world))
        if cfg.max_hours > 0:
            rules.append(TimeCap(cfg.max_hours))
        return cls(rules, slowest_before)

    def lap(self, now: float) -> None:
        """A loop iteration begins at `now` (seconds): the one before it ended then."""
        if self.lap_start is not None:
            self.recent.append(now - self.lap_start)
        self.lap_start = now

    def slowest(self) -> float:
        """The slowest recent loop iteration (0.0: none known yet); checkpoints keep it for a resume."""
        return max(self.recent, default=0.0)

    def due(self, step: int) -> bool:
        """Does the check run before `step`? Never without a rule."""
        return bool(self.rules) and step >= self.next_check

    def decide(self, usage: Usage) -> Decision:
        """Stop (the first rule the next iteration would pass), or go on and how many steps fit first."""
        margin = MARGIN * self.slowest()
        stop = next((rule.reason for rule in self.rules if rule.passed(usage, margin)), None)
        return Decision(stop, steps_that_fit(margin, *(rule.seconds_left(usage) for rule in self.rules)))

    def checked(self, step: int, decision: Decision) -> None:
        """The check before `step` decided `decision` (every rank calls this with rank 0's decision)."""
        self.next_check = step + max(1, decision.fit)
