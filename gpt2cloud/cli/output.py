"""How every command prints: JSON for scripts, one-line errors, key/value tables."""

from __future__ import annotations

import functools
import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from gpt2cloud.errors import UserError
from gpt2cloud.store import StorageError

err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2):
    """Print a one-line error (what is wrong and how to fix it) and exit; no traceback."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True)
    raise typer.Exit(code)


def handles_errors(fn):
    """Turn a UserError or StorageError (and Ctrl-C) into a one-line message with exit code 2 (130 for Ctrl-C)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, StorageError) as e:
            fail(str(e).replace("[", r"\["))
        except KeyboardInterrupt:
            fail("interrupted; everything written so far is kept (rerun to continue)", code=130)

    return wrapper


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def key_values(rows: list[tuple[str, str]], console: Console | None = None) -> None:
    """A borderless two-column table: bold keys, values (rich markup allowed)."""
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    (console or Console()).print(t)
