"""`gpt2cloud config set | get | show | unset`: the defaults `launch` uses where a flag is not given
($GPT2CLOUD_HOME/config.toml; the keys and their rules are in gpt2cloud/settings.py)."""

from __future__ import annotations

from typing import List

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpt2cloud.cli.completion import config_keys
from gpt2cloud.cli.output import err_console, print_json

KEY_HELP = "bucket, infra, gpus, max-cost, idle-minutes, notify or tracker."


def set_command(
    key: str = typer.Argument(..., help=KEY_HELP, autocompletion=config_keys),
    values: List[str] = typer.Argument(..., help="The value, checked as launch checks its flag; notify and "
                                                 "tracker take several (the list is replaced)."),
):
    """Set a default for `launch` (a flag always wins): e.g. `gpt2cloud config set bucket s3://my-bucket/runs`."""
    from gpt2cloud import settings

    name, value = settings.set_value(key, values)
    where = escape(str(settings.path()))
    Console(highlight=False).print(f"{name} = {escape(settings.describe(name, shown(name, value)))}  ({where})",
                                  soft_wrap=True)


def shown(name: str, value):
    """A value as set and show print it: webhook URLs are credentials, so the terminal (its scrollback, a shared
    screen) sees their scheme and host only; `config get notify` prints them whole."""
    if name != "notify" or not value:
        return value
    from model.notify import redact

    return [redact(u) for u in value]


def get_command(key: str = typer.Argument(..., help=KEY_HELP, autocompletion=config_keys)):
    """Print the value `launch` uses without a flag: the config file's, else the built-in default (a list one
    item a line; notify's webhook URLs whole, which set and show redact). Exit 1 if it has none."""
    from gpt2cloud import settings

    k = settings.key(key)
    value = settings.defaults()[k.name]
    if value is None:
        err_console.print(f"{k.name}: not set (built-in: {escape(k.builtin_text)}); set it with "
                          f"`gpt2cloud config set {k.name} {escape(k.example)}`", soft_wrap=True)
        raise typer.Exit(1)
    for v in value if isinstance(value, list) else [value]:
        typer.echo(settings.describe(k.name, v))


def show_command(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Show every default `launch` uses and where it comes from (the config file or built-in); webhook URLs
    show their scheme and host only (`config get notify` prints them whole)."""
    from gpt2cloud import settings

    found = settings.read()
    p = settings.path()
    if as_json:
        print_json({"path": str(p), "exists": p.is_file(),
                    "settings": {name: {"value": shown(name, found.get(name, k.builtin)),
                                        "source": settings.CONFIG if name in found else settings.DEFAULT}
                                 for name, k in settings.KEYS.items()}})
        return
    console = Console(highlight=False)
    console.print(f"[bold]config file[/] {escape(str(p))}{'' if p.is_file() else ' (not written yet)'}", soft_wrap=True)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_column(style="dim")
    for name in settings.KEYS:
        t.add_row(name, escape(settings.describe(name, shown(name, found.get(name)))),
                  "config file" if name in found else "built-in")
    console.print(t)


def unset_command(key: str = typer.Argument(..., help=KEY_HELP, autocompletion=config_keys)):
    """Remove a default from the config file: `launch` goes back to the built-in one."""
    from gpt2cloud import settings

    name, had = settings.unset(key)
    Console(highlight=False).print(f"{escape(name)}: {'removed' if had else 'was not set'} "
                                   f"({escape(str(settings.path()))})", soft_wrap=True)
