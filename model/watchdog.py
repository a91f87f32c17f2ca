"""The stall watchdog: a rank that makes no progress for too long ends its process.

A hung NCCL collective or a dead data read keeps a job "running" without a step ever finishing, so
SkyPilot's autostop (which waits for the job to end) never fires and the node bills on. The trainer
beats after every step, evaluation and checkpoint; when no beat comes for `seconds`, the watchdog
writes OUT/stalled (the node's run script turns it into EXIT_STALLED, an exit code that a managed
job recovers from) and ends the process. torchrun then stops the other ranks. A checkpoint is not
attempted: it would need the very collective that hangs; the run resumes from the last one.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

EXIT_STALLED = 75  # the node's exit code after a stall (EX_TEMPFAIL: a transient fault, worth a retry)
STALLED = "stalled"  # the marker file in OUT
# Written in OUT when a rank's watchdog starts: the trainer's start-up is over. Until then the node's run
# script bounds the start-up itself (model/deadman.py STARTUP_BOUND), since nothing here watches it yet.
STARTED = "started"


class Watchdog:
    def __init__(self, seconds: float, out: Path, log=print, mark_started: bool = False):
        self.seconds, self.out, self.log = seconds, Path(out), log
        # on a node only: the run script's start-up bound reads the marker; a local `train` writes nothing
        # in the user's OUT that it does not need (a refused resume must leave it as it was)
        self.mark_started = mark_started
        self.last = time.monotonic()
        self.what = "start-up"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="gpt2cloud-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        try:
            if self.mark_started:
                (self.out / STARTED).write_text(f"{os.getpid()}\n")
        except OSError:  # (a full disk fails the text, not the file; failing both, the run script's bound ends it)
            pass
        if self.seconds > 0:
            self._thread.start()
        return self

    def beat(self, what: str) -> None:
        """Progress: `what` just finished."""
        self.last = time.monotonic()
        self.what = what

    def stop(self) -> None:
        self._stop.set()
        try:
            if self.mark_started:
                (self.out / STARTED).unlink(missing_ok=True)  # the run is over: no marker of it left in OUT
        except OSError:
            pass

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.seconds / 10)):
            idle = time.monotonic() - self.last
            if idle > self.seconds:
                try:
                    (self.out / STALLED).write_text(f"{self.what}\n")
                except OSError:
                    pass
                # the log may block (a full pipe, a stuck terminal): it gets a moment, the exit does not wait
                message = (f"watchdog: nothing finished for {idle / 60:.1f} min (last: {self.what}); a rank or "
                           "the data is stuck: exiting so the node stops billing (resume from the last checkpoint)")
                logger = threading.Thread(target=self.log, args=(message,), daemon=True)
                logger.start()
                logger.join(timeout=2)
                os._exit(EXIT_STALLED)
