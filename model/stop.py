"""When the trainer stops before its last step, and when it checkpoints between steps: the stop policy,
decided from plain numbers.

Before a step the trainer asks whether one more loop iteration (step, evals, checkpoint) could take the
run past a cap: the cost cap (max_cost_usd at price_per_gpu_hour, over every rank's GPU-seconds), the
time cap (max_hours of wall time), or, on a node, pushes to the bucket failing for longer than the
checkpoint interval (PushStalled: what was trained since the last push lives only on the node, and a
preemption would lose it). It predicts the next iteration from the slowest recent one, with a 50%
margin for a busier host; a resumed run starts from the slowest its checkpoint saw, else a run stopped at
its cap would take one step past it when resumed.

The same check says when checkpoint_minutes have passed since the last checkpoint (CheckpointTimer):
rank 0 decides, and the decision crosses the ranks in the broadcast the check makes anyway, so a
time-based checkpoint costs no collective of its own.

Each check waits for the device (the time is only known then), so the policy also says how many steps
surely fit before the next check: about CHECK_SECONDS of them, never more than the caps allow, and none
past the next time-based checkpoint.

The divergence guard (Divergence) is the one rule not decided at the check: a non-finite loss must stop
the run within a step or two, and a check every step would cost a device sync and a broadcast each
step. It reads every step's loss, which the trainer all-reduces before anyone reads it: every rank
holds the same number (rank 0's, and everyone's), feeds it in the same order at the same point of the
loop, and so decides the same at the same step, with no collective of its own.

No torch here: the trainer feeds it seconds and losses, and a unit test can drive it with plain numbers.
A new rule (a signal asking for a clean stop) is a class with `reason`, `passed()` and `seconds_left()`,
one entry in STOP_REASONS, and its line in StopPolicy.from_config.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass

from model.config import DEFAULT_CHECKPOINT_MINUTES
from model.metrics import cost_usd

CHECK_SECONDS = 2.0  # the budget/time check (a host-device sync) runs about this often, or every step if slower
MARGIN = 1.5  # the next iteration may take this many times the slowest recent one
RECENT = 10  # loop iterations the prediction looks back over

# Every reason a rule may stop for, in a fixed order: rank 0 decides and sends the others its index
# (a number fits the broadcast tensor). When two rules pass at once, the earlier rule wins. "diverged"
# is the guard's (never broadcast: every rank decides it alike, see above).
STOP_REASONS = ("budget", "time", "push", "diverged", "requested")


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
    since_checkpoint: float = 0.0  # wall seconds since this run's newest checkpoint (or since it started)
    push_failing: float = 0.0  # seconds the node's pushes have been failing (0: the last one worked, or no pusher)
    stop_requested: bool = False  # `gpt2cloud down --graceful` asked for a stop (model/stoprequest.py)


@dataclass(frozen=True)
class Decision:
    stop: str | None  # a reason of STOP_REASONS; None: go on
    fit: int  # steps that surely fit before the next check (0: stop now)
    checkpoint: bool = False  # checkpoint before the next step: checkpoint_minutes have passed

    def encode(self) -> list[int]:
        """[reason's index + 1 (0: go on), fit, checkpoint]: what rank 0 broadcasts (DECISION_SIZE numbers)."""
        return [0 if self.stop is None else STOP_REASONS.index(self.stop) + 1, self.fit, int(self.checkpoint)]

    @classmethod
    def decode(cls, code: list[int]) -> "Decision":
        return cls(None if code[0] == 0 else STOP_REASONS[code[0] - 1], code[1], bool(code[2]))


DECISION_SIZE = len(Decision(None, 0).encode())


class CostCap:
    """max_cost_usd: every rank's GPU-seconds at price_per_gpu_hour."""

    reason = "budget"

    def __init__(self, max_cost_usd: float, price_per_gpu_hour: float, world: int, after_stop: float = 0.0):
        self.max_cost_usd, self.price_per_gpu_hour, self.world = max_cost_usd, price_per_gpu_hour, world
        self.after_stop = after_stop  # node seconds that bill after the stop (final push, idle): kept in reserve

    def passed(self, usage: Usage, margin: float) -> bool:
        """Would `margin` more seconds on every rank, and what bills after the stop, take the cost past the cap?"""
        extra = (margin + self.after_stop) * self.world
        return cost_usd(usage.gpu_seconds + extra, 1, self.price_per_gpu_hour) > self.max_cost_usd

    def seconds_left(self, usage: Usage) -> float:
        """Wall seconds of all ranks before the cap, less the reserve for what bills after the stop."""
        return (self.max_cost_usd / self.price_per_gpu_hour * 3600 / self.world - usage.gpu_seconds / self.world
                - self.after_stop)


class TimeCap:
    """max_hours of wall time (over all restarts; node time on a node)."""

    reason = "time"

    def __init__(self, max_hours: float):
        self.max_hours = max_hours

    def passed(self, usage: Usage, margin: float) -> bool:
        return usage.elapsed + margin > self.max_hours * 3600

    def seconds_left(self, usage: Usage) -> float:
        return self.max_hours * 3600 - usage.elapsed


class PushStalled:
    """On a node: its pushes to the bucket have been failing for longer than the checkpoint interval.
    What it trained since the last push that worked exists only on the node, and a preemption would lose
    it: stop with a checkpoint (the node's final push retries it) rather than train on."""

    reason = "push"

    def __init__(self, limit_seconds: float):
        self.limit_seconds = limit_seconds

    def passed(self, usage: Usage, margin: float) -> bool:
        return usage.push_failing > 0 and usage.push_failing + margin > self.limit_seconds

    def seconds_left(self, usage: Usage) -> float:
        # while pushes work there is nothing to count down: no reason to check more often
        return self.limit_seconds - usage.push_failing if usage.push_failing > 0 else math.inf


class StopRequested:
    """On a node: `gpt2cloud down --graceful` asked the run to stop (through the bucket; the pusher leaves
    the marker in OUT): stop at this check with a checkpoint, which the final push then saves."""

    reason = "requested"

    def passed(self, usage: Usage, margin: float) -> bool:
        return usage.stop_requested

    def seconds_left(self, usage: Usage) -> float:
        return math.inf  # a request comes when it comes: the timer's and the caps' checks look for it


class CheckpointTimer:
    """checkpoint_minutes: not a stop but a checkpoint, once the next iteration (with the policy's margin)
    would take the time since the last checkpoint past them: early by at most MARGIN iterations, never
    late, so a preemption loses at most that much."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60

    def due(self, usage: Usage, margin: float) -> bool:
        return usage.since_checkpoint + margin >= self.seconds

    def seconds_left(self, usage: Usage) -> float:
        return self.seconds - usage.since_checkpoint


class Diverged(Exception):
    """The guard's verdict: `why` (a phrase) at `step`; `spike`: the loss stayed high (finite), which a looser
    bound might let pass. Every rank raises it at the same step."""

    def __init__(self, why: str, step: int, spike: bool = False):
        super().__init__(why)
        self.why, self.step, self.spike = why, step, spike


class Divergence:
    """A run that diverged: a non-finite loss; a non-finite gradient norm (the update has put it into the
    weights; not checked under fp16's loss scaler, which skips such steps by design); or the loss above
    `factor` x its best for `steps` steps in a row (factor 0: that part off)."""

    reason = "diverged"

    def __init__(self, factor: float, steps: int, best: float | None = None):
        self.factor, self.steps = factor, max(1, steps)
        self.best = best if best is not None and math.isfinite(best) else None  # a resumed run's checkpoint loss
        self.above = 0  # steps in a row above the bound

    def observe(self, step: int, loss: float, grad_norm: float | None = None) -> str | None:
        """Why the run diverged at `step`, or None."""
        if not math.isfinite(loss):
            return f"loss {loss} at step {step}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm {grad_norm} at step {step} (loss {loss:.4f}), the weights now non-finite"
        bound = self.factor * self.best if self.factor > 0 and self.best is not None else math.inf
        self.above = self.above + 1 if loss > bound else 0
        self.best = loss if self.best is None else min(self.best, loss)
        if self.above >= self.steps:
            return (f"loss above {self.factor:g}x its best ({self.best:.4f}) for {self.steps} steps in a row, "
                    f"{loss:.4f} at step {step}")
        return None


class StopPolicy:
    """The rules in force, the checkpoint timer and the divergence guard, the recent loop iterations'
    seconds, and the step of the next check."""

    def __init__(self, rules: list, slowest_before: float = 0.0, timer: CheckpointTimer | None = None,
                 guard: Divergence | None = None):
        self.rules = list(rules)
        self.timer, self.guard = timer, guard
        # a resumed run's slowest recent iteration (its checkpoint's) counts until ten newer ones push it out
        self.recent = collections.deque([slowest_before] if slowest_before else [], maxlen=RECENT)
        self.lap_start: float | None = None
        self.next_check = 0  # the check runs before this step (then every few steps: Decision.fit)

    @classmethod
    def from_config(cls, cfg, world: int, slowest_before: float = 0.0, pushed: bool = False,
                    best_loss: float | None = None) -> "StopPolicy":
        """The caps a TrainConfig sets: a budget needs both max_cost_usd and a price; 0 turns a cap off.
        `pushed`: a pusher saves OUT to a bucket (a node), so failing pushes are a rule; a local run has
        none. The checkpoint timer runs unless checkpoint_minutes is 0; the guard always watches."""
        rules = []
        if cfg.max_cost_usd > 0 and cfg.price_per_gpu_hour > 0:
            rules.append(CostCap(cfg.max_cost_usd, cfg.price_per_gpu_hour, world, cfg.after_stop_seconds))
        if cfg.max_hours > 0:
            rules.append(TimeCap(cfg.max_hours))
        if pushed:  # the interval it may lose: its checkpoint interval (the default one when that is off)
            rules.append(PushStalled(60 * (cfg.checkpoint_minutes or DEFAULT_CHECKPOINT_MINUTES)))
            rules.append(StopRequested())  # a graceful `down` reaches the node through its pusher
        timer = CheckpointTimer(cfg.checkpoint_minutes) if cfg.checkpoint_minutes > 0 else None
        return cls(rules, slowest_before, timer, Divergence(cfg.loss_spike_factor, cfg.loss_spike_steps, best_loss))

    def resumed(self, slowest_before: float, best_loss: float | None) -> None:
        """A resumed run: its checkpoint's slowest recent iteration counts until ten newer ones push it out
        (else one stopped at its cap would take a step past it), its loss is the guard's best so far."""
        self.recent.clear()
        if slowest_before:
            self.recent.append(slowest_before)
        if self.guard is not None and best_loss is not None and math.isfinite(best_loss):
            self.guard.best = best_loss

    def lap(self, now: float) -> None:
        """A loop iteration begins at `now` (seconds): the one before it ended then."""
        if self.lap_start is not None:
            self.recent.append(now - self.lap_start)
        self.lap_start = now

    def slowest(self) -> float:
        """The slowest recent loop iteration (0.0: none known yet); checkpoints keep it for a resume."""
        return max(self.recent, default=0.0)

    def due(self, step: int) -> bool:
        """Does the check run before `step`? Never without a rule or the timer."""
        return bool(self.rules or self.timer) and step >= self.next_check

    def decide(self, usage: Usage) -> Decision:
        """Stop (the first rule the next iteration would pass), or go on: with a checkpoint first when the
        timer says so, and how many steps fit before the next check."""
        margin = MARGIN * self.slowest()
        stop = next((rule.reason for rule in self.rules if rule.passed(usage, margin)), None)
        checkpoint = stop is None and self.timer is not None and self.timer.due(usage, margin)
        if checkpoint:  # the steps that fit count from the checkpoint about to be written
            usage = dataclasses.replace(usage, since_checkpoint=0.0)
        lefts = [rule.seconds_left(usage) for rule in self.rules]
        if self.timer is not None:
            lefts.append(self.timer.seconds_left(usage))
        return Decision(stop, steps_that_fit(margin, *lefts), checkpoint)

    def observe(self, step: int, loss: float, grad_norm: float | None = None) -> None:
        """Every step's loss (all-reduced: the same on every rank), read back; raises Diverged."""
        why = self.guard.observe(step, loss, grad_norm) if self.guard is not None else None
        if why is not None:
            raise Diverged(why, step, spike=math.isfinite(loss) and self.guard.above >= self.guard.steps)

    def checked(self, step: int, decision: Decision) -> None:
        """The check before `step` decided `decision` (every rank calls this with rank 0's decision)."""
        self.next_check = step + max(1, decision.fit)
