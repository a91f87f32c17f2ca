"""model/stop.py: when the trainer stops early (cost cap, time cap, failing pushes), when it checkpoints
between steps (checkpoint_minutes), and when it calls a run diverged, decided from plain numbers.

No training and no torch: the policy is fed seconds, GPU-seconds and losses as the trainer would feed them.
The end-to-end behaviour (a checkpoint at the stop, the metrics line, resuming) is tests/test_trainer.py's,
tests/test_checkpoint_minutes.py's and tests/test_divergence.py's.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from model.config import DEFAULT_CHECKPOINT_MINUTES, TrainConfig
from model.stop import (CHECK_SECONDS, DECISION_SIZE, MARGIN, STOP_REASONS, CheckpointTimer, CostCap, Decision,
                        Diverged, Divergence, PushStalled, StopPolicy, TimeCap, Usage, steps_that_fit)
from trainer_helpers import REPO


def caps(max_cost_usd=0.0, price_per_gpu_hour=0.0, max_hours=0.0, checkpoint_minutes=0.0) -> TrainConfig:
    """The caps alone: the checkpoint timer off unless asked for (its own tests below)."""
    return TrainConfig(max_cost_usd=max_cost_usd, price_per_gpu_hour=price_per_gpu_hour, max_hours=max_hours,
                       checkpoint_minutes=checkpoint_minutes)


def with_laps(policy: StopPolicy, *seconds: float) -> StopPolicy:
    """Loop iterations of these lengths, one after another, as the trainer reports them: the time each begins."""
    if policy.lap_start is None:
        policy.lap(1000.0)
    now = policy.lap_start
    for s in seconds:
        now += s
        policy.lap(now)
    return policy


# $1 per GPU-second on one GPU: dollars and seconds are the same numbers
DOLLAR_A_SECOND = 3600.0


def test_under_budget_goes_on_for_the_steps_that_fit_before_the_next_check():
    policy = with_laps(StopPolicy.from_config(caps(10.0, DOLLAR_A_SECOND), world=1), 0.1, 0.08, 0.1)
    assert policy.slowest() == pytest.approx(0.1)
    # $9 spent, the next iteration predicted at 1.5 x 0.1 s: $9.15 <= $10. $1 left fits 6 of 0.15 s (6.67)
    decision = policy.decide(Usage(elapsed=9.0, gpu_seconds=9.0))
    assert decision == Decision(None, 6)
    # with plenty left, CHECK_SECONDS bounds it: 2 s / 0.15 s = 13 steps before the check must run again
    assert policy.decide(Usage(elapsed=1.0, gpu_seconds=1.0)) == Decision(None, int(CHECK_SECONDS / 0.15))
    policy.checked(20, decision)
    assert not policy.due(25) and policy.due(26) and policy.due(30)


def test_a_step_that_would_pass_the_cost_cap_stops_for_the_budget():
    policy = with_laps(StopPolicy.from_config(caps(10.0, DOLLAR_A_SECOND), world=1), 0.1)
    assert policy.decide(Usage(elapsed=9.9, gpu_seconds=9.9)).stop == "budget"  # $9.90 + $0.15 > $10
    assert policy.decide(Usage(elapsed=9.8, gpu_seconds=9.8)).stop is None  # $9.95: still within
    # every rank's GPU pays for the next iteration: on 2 GPUs the same $9.80 is $10.10 after it
    two = with_laps(StopPolicy.from_config(caps(10.0, DOLLAR_A_SECOND), world=2), 0.1)
    decision = two.decide(Usage(elapsed=4.9, gpu_seconds=9.8))
    assert decision.stop == "budget" and decision.fit == 0  # $0.20 left is 0.1 s of 2 GPUs: no 0.15 s step fits


def test_the_budget_stop_leaves_room_for_what_bills_after_it():
    """--max-cost caps the whole bill: the final push and the idle minutes after the stop are kept in reserve."""
    cfg = caps(10.0, DOLLAR_A_SECOND)
    cfg.after_stop_seconds = 2.0  # $2 on one GPU at $1 a second
    policy = with_laps(StopPolicy.from_config(cfg, world=1), 0.1)
    assert policy.decide(Usage(elapsed=7.9, gpu_seconds=7.9)).stop == "budget"  # $7.90 + $0.15 + $2 > $10
    go = policy.decide(Usage(elapsed=7.0, gpu_seconds=7.0))
    assert go.stop is None and go.fit == int(1.0 / 0.15)  # $1 left after the reserve: 6 steps of 0.15 s
    assert CostCap(10.0, DOLLAR_A_SECOND, 1, after_stop=2.0).seconds_left(Usage(7.0, 7.0)) == pytest.approx(1.0)


def test_the_time_cap_stops_for_time_and_the_budget_wins_a_tie():
    policy = with_laps(StopPolicy.from_config(caps(max_hours=1.0), world=8), 2.0)
    assert policy.decide(Usage(elapsed=3600 - 2.9, gpu_seconds=1e9)) == Decision("time", 0)  # 3 s more pass 1 h
    assert policy.decide(Usage(elapsed=3600 - 3.1, gpu_seconds=1e9)).stop is None  # no budget: GPU-seconds free
    both = with_laps(StopPolicy.from_config(caps(10.0, DOLLAR_A_SECOND, max_hours=1.0), world=1), 2.0)
    assert both.decide(Usage(elapsed=3600.0, gpu_seconds=3600.0)).stop == "budget"
    assert both.decide(Usage(elapsed=3600.0, gpu_seconds=1.0)).stop == "time"


def test_a_resumed_runs_slowest_iteration_counts_until_newer_ones_replace_it():
    """A run stopped at its cap, resumed with the same cap, must not take one more step: the slowest
    iteration its checkpoint saw is the estimate before this run has timed any of its own."""
    cfg, usage = caps(max_hours=1.0), Usage(elapsed=3600 - 14.0, gpu_seconds=0.0)
    fresh = StopPolicy.from_config(cfg, world=1)
    assert fresh.slowest() == 0.0 and fresh.decide(usage) == Decision(None, 1)  # no time known: check every step
    resumed = StopPolicy.from_config(cfg, world=1, slowest_before=10.0)
    assert resumed.slowest() == 10.0 and resumed.decide(usage).stop == "time"  # 14 s left < 1.5 x 10 s
    with_laps(resumed, *[1.0] * 9)
    assert resumed.slowest() == 10.0  # nine faster iterations: the resumed one is still among the last ten
    with_laps(resumed, 1.0)
    assert resumed.slowest() == 1.0 and resumed.decide(usage).stop is None


def test_no_caps_never_stop():
    for cfg in (caps(), caps(max_cost_usd=5.0)):  # a budget without a price cannot be counted: no cap
        policy = with_laps(StopPolicy.from_config(cfg, world=8), 100.0)
        assert policy.rules == []
        assert not any(policy.due(step) for step in (0, 1, 10**9))
        assert policy.decide(Usage(elapsed=1e12, gpu_seconds=1e12)).stop is None


def test_the_rules_a_config_sets():
    rules = StopPolicy.from_config(caps(10.0, 2.0, max_hours=3.0), world=4).rules
    assert [type(r) for r in rules] == [CostCap, TimeCap] and [r.reason for r in rules] == ["budget", "time"]
    assert rules[0].seconds_left(Usage(0.0, 0.0)) == pytest.approx(10.0 / 2.0 * 3600 / 4)  # $10 of 4 GPUs at $2
    assert rules[1].seconds_left(Usage(3600.0, 0.0)) == 2 * 3600
    assert StopPolicy.from_config(caps(max_hours=3.0), world=1).due(0)  # the first check is before step 0


def test_a_decision_crosses_ranks_as_three_numbers():
    for decision in (Decision(None, 7), Decision(None, 5, checkpoint=True),
                     *(Decision(reason, 0) for reason in STOP_REASONS)):
        code = decision.encode()
        assert len(code) == DECISION_SIZE == 3 and all(isinstance(c, int) for c in code)
        assert Decision.decode(code) == decision
    assert Decision(None, 3).encode()[0] == 0  # 0: go on
    assert Decision(None, 3).encode()[2] == 0 and Decision(None, 3, checkpoint=True).encode()[2] == 1


# ---- checkpoint_minutes: the timer rides on the same check ----


def test_the_timer_checkpoints_before_the_interval_passes_and_bounds_the_steps_between_checks():
    policy = with_laps(StopPolicy.from_config(caps(checkpoint_minutes=1.0), world=8), 0.1)  # 60 s; margin 0.15 s
    assert policy.rules == [] and isinstance(policy.timer, CheckpointTimer)
    assert policy.due(0)  # the timer alone makes the check run
    assert policy.decide(Usage(0.0, 0.0, since_checkpoint=30.0)) == Decision(None, int(CHECK_SECONDS / 0.15))
    # 1 s before the minute: the check must come back before it passes (6 x 0.15 s fit), no checkpoint yet
    assert policy.decide(Usage(0.0, 0.0, since_checkpoint=59.0)) == Decision(None, 6)
    # the next iteration would pass the minute: checkpoint now; the steps that fit count from that checkpoint
    assert policy.decide(Usage(0.0, 0.0, since_checkpoint=59.9)) == Decision(None, int(CHECK_SECONDS / 0.15), True)
    assert policy.decide(Usage(0.0, 0.0, since_checkpoint=600.0)).checkpoint  # late (a long eval): at once


def test_a_stop_wins_over_a_timed_checkpoint_and_no_timer_means_no_check():
    policy = with_laps(StopPolicy.from_config(caps(10.0, DOLLAR_A_SECOND, checkpoint_minutes=1.0), world=1), 0.1)
    assert policy.decide(Usage(9.9, 9.9, since_checkpoint=60.0)) == Decision("budget", 0)  # its own checkpoint
    off = StopPolicy.from_config(caps(checkpoint_minutes=0.0), world=1)
    assert off.timer is None and not off.due(0)
    assert StopPolicy.from_config(TrainConfig(), world=1).timer.seconds == DEFAULT_CHECKPOINT_MINUTES * 60


# ---- pushes failing on a node ----


def test_pushes_failing_longer_than_the_checkpoint_interval_stop_the_run_on_a_node_only():
    cfg = caps(checkpoint_minutes=5.0)
    assert not any(isinstance(r, PushStalled) for r in StopPolicy.from_config(cfg, world=1).rules)  # local: no pusher
    policy = with_laps(StopPolicy.from_config(cfg, world=1, pushed=True), 2.0)  # margin 3 s
    assert [type(r).__name__ for r in policy.rules] == ["PushStalled", "StopRequested"]
    assert policy.rules[0].limit_seconds == 300
    assert policy.decide(Usage(0.0, 0.0, push_failing=0.0)).stop is None  # pushes work
    going = policy.decide(Usage(0.0, 0.0, push_failing=250.0))
    assert going.stop is None and going.fit == 1  # 50 s left; a 3 s iteration is past CHECK_SECONDS: every step
    assert policy.decide(Usage(0.0, 0.0, push_failing=298.0)) == Decision("push", 0)  # 298 + 3 s > 5 min
    # the budget still wins a tie; with the timer off the interval is the default one
    both = with_laps(StopPolicy.from_config(caps(10.0, DOLLAR_A_SECOND), world=1, pushed=True), 2.0)
    assert both.decide(Usage(9.0, 9.0, push_failing=1e6)).stop == "budget"
    assert both.rules[-2].limit_seconds == DEFAULT_CHECKPOINT_MINUTES * 60


# ---- the divergence guard ----


def _observe(guard: Divergence, losses, norm=1.0) -> int | None:
    """The step (1-based) at which the guard calls the run diverged, or None."""
    for step, loss in enumerate(losses, start=1):
        if guard.observe(step, loss, norm) is not None:
            return step
    return None


def test_a_non_finite_loss_or_gradient_norm_is_divergence_at_once():
    assert _observe(Divergence(2.0, 20), [5.0, 4.0, 3.0]) is None
    assert _observe(Divergence(2.0, 20), [5.0, 4.0, math.nan, 3.0]) == 3
    assert _observe(Divergence(2.0, 20), [5.0, math.inf]) == 2
    assert _observe(Divergence(0.0, 20), [5.0, -math.inf]) == 2  # the spike part off: non-finite still stops
    guard = Divergence(2.0, 20)
    assert "gradient norm inf" in guard.observe(1, 5.0, math.inf)
    assert guard.observe(2, 5.0, None) is None  # under fp16's loss scaler the norm is not judged


def test_a_loss_held_above_the_bound_for_k_steps_is_divergence_and_a_passing_spike_is_not():
    # best 3.0, bound 6.0: two steps above, back under (the count restarts), then three in a row
    losses = [5.0, 4.0, 3.0, 7.0, 7.0, 5.0, 7.0, 7.0, 7.0]
    assert _observe(Divergence(2.0, 3), losses) == 9
    assert _observe(Divergence(2.0, 4), losses) is None
    assert _observe(Divergence(0.0, 3), losses) is None  # factor 0: only non-finite losses
    assert _observe(Divergence(2.0, 3), [6.0, 6.0, 6.0]) is None  # exactly at the bound is within it
    # a resumed run starts from its checkpoint's loss (every rank reads the same one); a NaN one is ignored
    assert _observe(Divergence(2.0, 2, best=3.0), [7.0, 7.0]) == 2
    assert _observe(Divergence(2.0, 2, best=math.nan), [7.0, 7.0]) is None


def test_the_policy_raises_the_guards_verdict_with_its_step():
    policy = StopPolicy.from_config(TrainConfig(loss_spike_factor=2.0, loss_spike_steps=2), world=2)
    policy.observe(1, 3.0, 1.0)
    with pytest.raises(Diverged) as nan:
        policy.observe(2, math.nan, 1.0)
    assert nan.value.step == 2 and "loss nan at step 2" in nan.value.why and not nan.value.spike
    policy = StopPolicy.from_config(TrainConfig(loss_spike_factor=2.0, loss_spike_steps=2), world=2, best_loss=3.0)
    policy.observe(1, 7.0, 1.0)
    with pytest.raises(Diverged) as spike:
        policy.observe(2, 7.0, 1.0)
    assert spike.value.spike and "above 2x its best (3.0000) for 2 steps" in spike.value.why


def test_steps_that_fit_lives_in_the_policy_and_the_trainer_still_names_it():
    from model import train

    assert train.steps_that_fit is steps_that_fit and train.CHECK_SECONDS == CHECK_SECONDS
    assert steps_that_fit(0.0, 10.0) == 1
    assert steps_that_fit(0.5, math.inf, 10.0) == int(CHECK_SECONDS / 0.5)
    assert steps_that_fit(MARGIN * 1.0, 2.9) == 1 and steps_that_fit(MARGIN * 1.0, 1.0) == 0


def test_the_policy_needs_no_torch():
    p = subprocess.run([sys.executable, "-c", "import sys, model.stop; print('torch' in sys.modules)"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stderr


def test_a_graceful_down_stops_a_node_at_its_next_check():
    """`down --graceful` reaches the trainer as usage.stop_requested (model/stoprequest.py's marker, read on
    a node only): it stops at the next check, with a checkpoint, whatever the caps say."""
    on_node = with_laps(StopPolicy.from_config(caps(), world=8, pushed=True), 1.0)
    assert on_node.decide(Usage(elapsed=10.0, gpu_seconds=80.0)).stop is None
    assert on_node.decide(Usage(elapsed=10.0, gpu_seconds=80.0, stop_requested=True)).stop == "requested"
    local = with_laps(StopPolicy.from_config(caps(), world=1), 1.0)  # `gpt2cloud train`: no pusher, no request
    assert local.decide(Usage(elapsed=10.0, gpu_seconds=10.0, stop_requested=True)).stop is None
    assert Decision.decode(Decision("requested", 0).encode()) == Decision("requested", 0)
