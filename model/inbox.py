"""A daemon thread fed through a bounded queue: what the trackers (model/trackers.py) and the webhooks
(model/notify.py) both run on, so that a client that hangs never holds the training loop or its exit.

The caller only ever puts without waiting (False: the queue is full, the consumer hangs); the thread
takes items in order until finish(); join() waits no longer than a deadline. Daemon threads: a client
still hanging after its wait must not keep the process, and the node that bills for it, alive.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator


class _Close:
    """The queue's last item."""


class Inbox:
    """A subclass's run() works on the thread, reading the items in order with items(). It sets its own
    fields before calling Inbox.__init__, which starts the thread."""

    def __init__(self, name: str, size: int):
        self.queue: queue.Queue = queue.Queue(size)
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)
        self.thread.start()

    def run(self) -> None:
        raise NotImplementedError

    def put(self, item) -> bool:
        """Hand an item over (never waits); False when the queue is full."""
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            return False

    def finish(self) -> bool:
        """The thread's last item, after what is queued; False when the queue is full (the thread hangs)."""
        return self.put(_Close)

    def items(self) -> Iterator:
        """On the thread: each item as it comes, until finish()."""
        while True:
            item = self.queue.get()
            if item is _Close:
                return
            yield item

    def join(self, deadline: float) -> bool:
        """Wait for the thread until `deadline` (time.monotonic()); True when it has ended."""
        self.thread.join(max(0.0, deadline - time.monotonic()))
        return not self.thread.is_alive()
