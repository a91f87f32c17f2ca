"""model/stop.py: when the trainer stops early (cost cap, time cap), decided from plain numbers.

No training and no torch: the policy is fed seconds and GPU-seconds as the trainer would feed them.
The end-to-end behaviour (a checkpoint at the stop, the metrics line, resuming) is tests/test_trainer.py's.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from model.config import TrainConfig
from model.stop import (CHECK_SECONDS, MARGIN, STOP_REASONS, CostCap, Decision, StopPolicy, TimeCap, Usage,
                        steps_that_fit)
from trainer_helpers import REPO


def caps(max_cost_usd=0.0, price_per_gpu_hour=0.0, max_hours=0.0) -> TrainConfig:
    return TrainConfig(max_cost_usd=max_cost_usd, price_per_gpu_hour=price_per_gpu_hour, max_hours=max_hours)


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


def test_a_decision_crosses_ranks_as_two_numbers():
    for decision in (Decision(None, 7), *(Decision(reason, 0) for reason in STOP_REASONS)):
        code = decision.encode()
        assert len(code) == 2 and all(isinstance(c, int) for c in code)
        assert Decision.decode(code) == decision
    assert Decision(None, 3).encode()[0] == 0  # 0: go on


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
