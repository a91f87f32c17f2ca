"""The installed `gpt2cloud` console script: real processes, real exit codes, no heavy imports."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = shutil.which("gpt2cloud") or str(Path(sys.executable).parent / "gpt2cloud")


def run(*args):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60)


def test_entry_point_estimate_json():
    res = run("estimate", "gpt2-124m", "--gpus", "H100:8", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["params"] == 124_439_808


def test_entry_point_bad_input_exits_2_without_traceback():
    res = run("estimate", "gpt2-124m", "--gpus", "H100:0")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "1 to 64" in res.stderr


def test_help_and_estimate_import_neither_torch_nor_sky():
    code = (
        "import sys\n"
        "from gpt2cloud.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['estimate', 'gpt2-124m', '--json']); assert r.exit_code == 0, r.output\n"
        "bad = [m for m in ('torch', 'sky', 'boto3', 'matplotlib', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_help_and_version(args):
    res = run(*args)
    assert res.returncode == 0 and "gpt2cloud" in res.stdout
