"""How the trainer process ends: a refusal's one line and exit code, and an exit nothing can hold.

A refusal (bad config, damaged checkpoint, a diverged run) prints one `error:` line on rank 0, notes it
where the CLI looks (ERROR_FILE_ENV) and exits with its code. A tracker whose close did not return
(wandb's atexit hook joins its service process without a timeout, Trackio's finish may hang) could hold
the process's exit, and a node bills until the process is gone: then the trainer ends with os._exit.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from model.config import ERROR_FILE_ENV, EXIT_REFUSED


class Ending:
    hung = False  # rank 0: a tracker's close still hangs (or failed); main() ends the process itself


def end_now(code: int) -> None:
    """The process ends here with `code`, whatever thread or atexit hook would hold it (a tracker's client)."""
    print(f"note: a tracker is still closing; the trainer exits ({code}) without waiting for it",
          file=sys.stderr, flush=True)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def exit_code(code) -> int:
    """The status sys.exit(code) exits with."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr, flush=True)
    return 1


def refuse(message: str, code: int = EXIT_REFUSED) -> None:
    """Print the one line (rank 0: every rank hits the same problem), note it where the CLI looks, exit
    `code` (2: a refusal; EXIT_DIVERGED: the run diverged)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
        if os.environ.get(ERROR_FILE_ENV):
            Path(os.environ[ERROR_FILE_ENV]).write_text(message + "\n", encoding="utf-8")
    sys.exit(code)
