"""Shared by the "nothing you own is lost" tables (issue 20; docs/ownership.md): what a user owns,
fingerprinted before and after a command, and the one way a refusal looks.

Each row of a table runs one command the way a user would (the Typer app in-process, or a real
subprocess where a signal or a child process is the point) against files the tool did not write, and
asserts: exit code 2, one `error:` line naming what is there and the ways on, no traceback, and every
file the user had byte-for-byte unchanged (sha256 before and after), nothing added or removed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner


def fingerprint(*roots) -> dict[str, str]:
    """{path: sha256 of a file, "dir" for a directory} for everything under the roots (a missing root: {})."""
    out = {}
    for root in map(Path, roots):
        if root.is_file():
            out[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for p in sorted(root.rglob("*")) if root.is_dir() else []:
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(args, **kw):
    """Run `gpt2cloud ARGS` in-process (stdout and stderr together in .output)."""
    from gpt2cloud.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kw)


def error_line(output: str) -> str:
    """The one `error:` line of a refusal (warning lines about damaged state files aside)."""
    lines = [line for line in output.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{output}"
    return lines[0]


def one_line_error(result, *fragments) -> str:
    """A CliRunner result that failed with exit 2, no traceback and one `error:` line holding each fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    line = error_line(result.output)
    for f in fragments:
        assert f in line, result.output
    return line


def assert_refused(result, needle: str, before: dict, after: dict, exit_code: int = 2) -> str:
    """Exit 2, one `error:` line containing `needle`, no traceback, the user's files unchanged."""
    output = result.output if hasattr(result, "output") else (result.stdout or "") + (result.stderr or "")
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == exit_code, f"exit {code}, not {exit_code}:\n{output}"
    assert "Traceback" not in output, output
    line = error_line(output)
    assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert not changed, f"the user's files changed: {sorted(changed)}"
    return line
