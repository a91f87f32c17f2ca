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


def show_task(task_cfg: dict, *, run_id: str, local: bool, dry_run: bool, export_yaml, write_workdir,
              as_json: bool, estimate: dict, retry: bool = False) -> None:
    """`--dry-run` / `--export-yaml` of a SkyPilot task (launch, data prepare --on-cloud): SkyPilot's own
    parser checks it, the YAML (secrets redacted) goes to stdout or the file, nothing is launched.
    write_workdir() writes what the file's `workdir` names (only for an export: a dry run writes nothing)."""
    from gpt2cloud.launch import task

    if not local:
        from gpt2cloud.backends.skypilot import to_sky_task

        to_sky_task(task_cfg)  # SkyPilot's own parser accepts it (or says why not)
    text = task.to_yaml(task_cfg, retry=retry)
    if export_yaml is not None:
        write_workdir()  # `sky launch FILE` ships the workdir the file names
        export_yaml.parent.mkdir(parents=True, exist_ok=True)
        export_yaml.write_text(text)
    if as_json:
        print_json({"run": run_id, "dry_run": True, "yaml": text, "export_yaml": str(export_yaml or ""),
                    "estimate": estimate})
    elif dry_run:
        sys.stdout.write(text)
    if export_yaml is not None and not as_json:
        err_console.print(f"wrote {export_yaml}; launch it with: {task.sky_command(task_cfg, str(export_yaml), retry=retry)}",
                          soft_wrap=True)
