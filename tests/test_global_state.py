"""The suite's guard against leaked global state (tests/conftest.py), and the library calls that
change process-wide state putting it back (issue 19: a leaked handler hung a later fork)."""

from __future__ import annotations

import os
import signal

from conftest import _diff, _restore, global_state
from model import sync


def test_the_guard_sees_every_kind_of_leak(tmp_path):
    before = global_state()
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    os.environ["GPT2CLOUD_LEAK"] = "1"
    os.chdir(tmp_path)
    try:
        after = global_state()
        leaks = {name: _diff(name, before[name], after[name]) for name in before if after[name] != before[name]}
        assert set(leaks) == {"signal handlers", "environment", "working directory"}
        assert "SIGUSR1" in leaks["signal handlers"] and "GPT2CLOUD_LEAK" in leaks["environment"]
    finally:
        _restore(before)
    assert global_state() == before and signal.getsignal(signal.SIGUSR1) is previous


def test_push_loop_gives_the_callers_handlers_back(tmp_path):
    """push_loop installs its own SIGTERM/SIGINT/SIGHUP handlers while it runs; after it, the caller's."""
    mine = lambda *_: None  # noqa: E731
    saved = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        out = tmp_path / "out"
        (out / "logs").mkdir(parents=True)
        bucket = tmp_path / "bucket"
        bucket.mkdir()
        assert sync.push_loop(str(out), bucket.as_uri(), every=60, rank=0, keep=0, once=True) == 0
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGHUP) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
