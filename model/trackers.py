"""Where the trainer's metrics go: OUT/metrics.jsonl always (the run's own record, which the bucket,
`status`, `plot` and `report` read), and every tracker the config names (cfg.trackers).

A tracker is anything with write(record) and close(), built by a factory(cfg, out) registered by name in
TRACKERS: an experiment tracker (wandb, ...) is one module with its class and one line here. Only rank 0
writes. A tracker that fails is noted once and dropped: a tracker's outage never stops a paid run, and
metrics.jsonl still holds every line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from model.metrics import MetricsLog

# name -> factory(cfg: TrainConfig, out: Path) -> tracker (write(record), close())
TRACKERS: dict[str, Callable] = {}


def check_names(names) -> list[str]:
    """The tracker names no entry of TRACKERS has (checked on every rank, before any process group)."""
    return [n for n in names if n not in TRACKERS]


class Metrics:
    """metrics.jsonl plus the configured trackers, written together."""

    def __init__(self, path: Path, enabled: bool, cfg, out: Path):
        self.log = MetricsLog(path, enabled=enabled)
        self.trackers = {}
        for name in (cfg.trackers if enabled else ()):  # names checked on every rank by check_names()
            try:
                self.trackers[name] = TRACKERS[name](cfg, out)
            except Exception as e:  # noqa: BLE001 - a login or a server that fails: train without it
                self.trackers[name] = None
                self._drop(name, e)

    def write(self, record: dict) -> None:
        self.log.write(record)
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.write(record)
            except Exception as e:  # noqa: BLE001 - any failure of a tracker's client: drop it, keep training
                self._drop(name, e)

    def close(self) -> None:
        self.log.close()
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.close()
            except Exception as e:  # noqa: BLE001
                self._drop(name, e)

    def _drop(self, name: str, error: Exception) -> None:
        del self.trackers[name]
        print(f"note: tracker {name} failed ({type(error).__name__}: {error}); metrics.jsonl still has every "
              "line", file=sys.stderr, flush=True)
