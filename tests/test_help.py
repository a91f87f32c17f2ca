"""Every `--help` page renders, and says what its source says.

The commands are discovered from the app itself (the click tree Typer builds), so a new command or
subcommand is covered without editing this file. Typer renders help text as rich markup: a bracketed
word in a help string (`hf://ORG/REPO[/PATH]`) is read as a tag and either breaks the page
(MarkupError, exit 1) or silently vanishes from it. Both are checked: the page exits 0, and every
bracketed token of every help text appears on it literally.
"""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from gpt2cloud.cli.app import app

BRACKETED = re.compile(r"\[[^\]\s]*\]")


def command_paths(command, path=()):
    """(path, click command) for the app and every command and subcommand below it."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from command_paths(sub, (*path, name))


PAGES = list(command_paths(typer.main.get_command(app)))


def flat(text: str) -> str:
    """The page as one line: box borders and wrapping removed."""
    return " ".join(text.replace("│", " ").replace("╭", " ").replace("╰", " ").split())


def source_texts(command) -> list[str]:
    """The help strings the page is built from, as a reader should see them (rich escapes undone)."""
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    return [t.replace("\\[", "[") for t in texts]


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in PAGES}
    assert {"", "estimate", "launch", "data", "data prepare", "data upload", "data download", "status",
            "logs", "fetch", "down", "runs", "train", "sample", "eval", "plot", "report", "export"} <= names


@pytest.mark.parametrize("path,command", PAGES, ids=[" ".join(p) or "gpt2cloud" for p, _ in PAGES])
def test_help_page_renders_and_keeps_its_brackets(path, command, monkeypatch):
    monkeypatch.setenv("TERMINAL_WIDTH", "160")
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"gpt2cloud {' '.join(path)} --help: {result.output}{result.exception!r}"
    page = flat(result.output)
    assert "Usage:" in page and "--help" in page
    for text in source_texts(command):
        for token in BRACKETED.findall(text):
            assert token in page, f"{token!r} of {text!r} is missing from `{' '.join(path)} --help` (rich markup?)"
