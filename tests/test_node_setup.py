"""The node's setup script, run for real on this machine: its fast paths and the timeline of its parts.

A fresh cloud node's installs (uv or pip fetching CUDA torch) need the internet and a GPU driver, so they
run only on real nodes; what is tested here is everything around them: a node that already has the
dependencies installs nothing, the wheel goes in without the network, each part's span reaches the
timeline, and `--image` reaches SkyPilot as image_id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)

from gpt2cloud.backends.skypilot import to_sky_task
from gpt2cloud.errors import UserError
from gpt2cloud.launch import build, scripts
from gpt2cloud.launch.plan import plan


def _node(tmp_path):
    workdir = tmp_path / "workdir"
    build.write_workdir(workdir, build.wheel_bytes(), "{}", "")
    node = tmp_path / "node"
    (node / "venv" / "bin").mkdir(parents=True)
    python = node / "venv" / "bin" / "python"  # stands in for the venv an earlier setup made on this node
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("GPT2CLOUD_PYTHON", "PYTHONPATH")}
    env.update({"GPT2CLOUD_NODE_HOME": str(node), "GPT2CLOUD_TORCH_SPEC": "torch==2.13.0", "GPT2CLOUD_DEVICE": "auto",
                "GPT2CLOUD_GPUS_PER_NODE": "1", "GPT2CLOUD_BUILD": "test"})
    return workdir, node, env


def test_a_node_with_the_dependencies_installs_only_the_wheel(tmp_path):
    workdir, node, env = _node(tmp_path)
    (node / "deps").write_text(f"torch==2.13.0 {' '.join(build.NODE_REQUIREMENTS)}\n")
    t0 = time.time()
    p = subprocess.run(["bash", "-c", scripts.render(scripts.SETUP_SCRIPT)], cwd=workdir, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "dependencies already on this node" in p.stdout and time.time() - t0 < 30
    assert (node / "python").read_text().strip() == str(node / "venv" / "bin" / "python")
    assert (node / "site" / "model" / "train.py").is_file()  # this build, installed from the workdir's wheel
    parts = [line.split()[0] for line in (node / "setup_times").read_text().splitlines()]
    assert parts == ["wheel", "setup"]  # no venv, torch or deps: nothing was downloaded


def test_other_dependencies_are_not_taken_for_installed(tmp_path):
    """A node whose venv was set up for another torch spec does not reuse it (the check compares the whole
    list): here it starts over, which on this offline stand-in means it removes the old venv first."""
    workdir, node, env = _node(tmp_path)
    (node / "deps").write_text("torch==2.0.0 numpy\n")
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "python3"  # a python3 whose venv step fails: the run stops, nothing half-installed
    fake.write_text("#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    p = subprocess.run(["bash", "-c", scripts.render(scripts.SETUP_SCRIPT)], cwd=workdir, env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and "already on this node" not in p.stdout
    assert not (node / "venv").exists() and not (node / "deps").exists() and not (node / "python").exists()


def test_the_setup_parts_reach_the_timeline(tmp_path):
    """The run script turns setup_times into one `setup` event whose parts say where the minutes went."""
    node = tmp_path / "node"
    node.mkdir()
    (node / "setup_times").write_text("venv 100.0 103.5\ntorch 103.5 150.25\ndeps 150.25 155.0\n"
                                      "wheel 155.0 156.0\nsetup 99.5 156.0\n")
    run = scripts.render(scripts.RUN_SCRIPT)
    start = run.index("# the setup's span")
    snippet = run[start: run.index("fi\n", start) + 3]
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run(["bash", "-c", f'NODE_HOME="{node}"; OUT="{out}"\n{snippet}'], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (event,) = [json.loads(line) for line in (out / "timeline.jsonl").read_text().splitlines()]
    assert event["event"] == "setup" and event["start"] == 99.5 and event["time"] == 156.0
    assert event["parts"] == {"venv": 3.5, "torch": 46.75, "deps": 4.75, "wheel": 1.0}


def test_image_reaches_skypilot_as_image_id(sky_mod, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    image = "docker:pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime"
    p = plan("gpt2-124m", "H100:8", infra="lambda", data="s3://bkt/d", bucket="s3://bkt/r", name="img", image=image)
    assert p.task_cfg["resources"]["image_id"] == image and p.spec.image == image
    (res,) = list(to_sky_task(p.task_cfg, p.secrets).resources)
    assert res.extract_docker_image() == image[len("docker:"):]


@pytest.mark.parametrize("image, infra, message", [
    ("docker:", "lambda", "expected docker:REPOSITORY[:TAG]"),
    ("docker:pytorch/pytorch", "local", "--infra local runs on this machine's Python"),
    ("my image", "lambda", "expected docker:REPOSITORY[:TAG] or a cloud image id"),
])
def test_bad_images_are_refused(sky_mod, tmp_path, monkeypatch, image, infra, message):
    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "g2"))
    data = "s3://bkt/d" if infra != "local" else (tmp_path / "d").as_uri()
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan("gpt2-tiny", "H100:1" if infra != "local" else "CPU:1", infra=infra, data=data,
             bucket=data.replace("/d", "/r"), name="img", image=image)


def test_a_relaunch_onto_a_node_holding_an_older_build_runs_this_one(tmp_path):
    """A relaunch onto a cluster that is still up: SkyPilot skips setup when the task's config hash matches,
    so the node holds an earlier launch's wheel. The run script sees that its workdir ships another build,
    runs setup again (its fast path: only the wheel goes in) and trains with this build; a run of the same
    build sets nothing up again."""
    import hashlib
    import io
    import zipfile

    from node_helpers import node_env, run_script, uploaded_data
    from trainer_helpers import make_shards, read_metrics, tiny_config

    new = build.wheel_bytes()
    with zipfile.ZipFile(io.BytesIO(new[1])) as z:
        files = [(n, z.read(n)) for n in z.namelist() if ".dist-info/" not in n]
    stale = b'raise SystemExit("the OLD build ran")\n'  # an older trainer: it would fail the run
    old = build.pack_wheel([(n, stale if n == "model/train.py" else d) for n, d in files], ("torch",), "older")
    assert old[0] == new[0] and old[1] != new[1]  # same file name, another build
    run_dir = tmp_path / "bucket" / "r1"
    e = node_env(tmp_path, uploaded_data(tmp_path, make_shards(tmp_path / "shards")), run_dir.as_uri())
    old_workdir, new_workdir = tmp_path / "old", tmp_path / "new"
    build.write_workdir(old_workdir, old, "{}", "")
    build.write_workdir(new_workdir, new, tiny_config(steps=2).to_json(), "")
    p, _ = run_script(scripts.SETUP_SCRIPT, old_workdir, e)  # the earlier launch's setup
    node = tmp_path / "node"
    assert p.returncode == 0 and (node / "site" / "model" / "train.py").read_bytes() == stale, p.stderr

    p, _ = run_script(scripts.RUN_SCRIPT, new_workdir, e)  # this launch: its setup was skipped
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    assert "not this task's" in log and "setting it up again" in log and "OLD build" not in log
    assert [r["step"] for r in read_metrics(node / "out") if "loss" in r] == [1, 2]
    assert (node / "site" / "model" / "train.py").read_bytes() == dict(files)["model/train.py"]
    assert (node / "build").read_text().strip() == hashlib.sha256(new[1]).hexdigest()

    p, _ = run_script(scripts.RUN_SCRIPT, new_workdir, e)  # the same build again: nothing to set up
    assert p.returncode == 0 and "setting it up again" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]


def test_a_runs_tracker_packages_are_installed_only_when_asked(tmp_path):
    """GPT2CLOUD_NODE_EXTRAS (the trackers' packages, gpt2cloud/launch/build.py): installed on the node's
    fast path too, and recorded, so a relaunch asking for other trackers sets up again."""
    workdir, node, env = _node(tmp_path)
    (node / "deps").write_text(f"torch==2.13.0 {' '.join(build.NODE_REQUIREMENTS)}\n")
    python = node / "venv" / "bin" / "python"  # records pip installs instead of reaching the network
    python.write_text(f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = install ] && [ "$4" = -q ] '
                      f'&& [ "$5" != --no-deps ]; then echo "$@" >> "{tmp_path}/pip.log"; exit 0; fi\n'
                      f'exec "{sys.executable}" "$@"\n')
    setup = scripts.render(scripts.SETUP_SCRIPT)
    p = subprocess.run(["bash", "-c", setup], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not (tmp_path / "pip.log").exists() and (node / "extras").read_text().strip() == ""
    env["GPT2CLOUD_NODE_EXTRAS"] = "tensorboard wandb"
    p = subprocess.run(["bash", "-c", setup], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "pip.log").read_text().split() == ["-m", "pip", "install", "-q", "tensorboard", "wandb"]
    assert (node / "extras").read_text().strip() == "tensorboard wandb"
    # a relaunch onto this node (SkyPilot skipped setup) asking for other trackers: the run script sets up
    # again, installing what it asks for (then stops: this test gives it no run URL to train into)
    env["GPT2CLOUD_NODE_EXTRAS"] = "tensorboard"
    p = subprocess.run(["bash", "-c", scripts.render(scripts.RUN_SCRIPT)], cwd=workdir, env=env, capture_output=True,
                       text=True, timeout=120)
    log = p.stdout + p.stderr
    assert "(tracker packages: tensorboard wandb), not this task's" in log and "setting it up again" in log, log
    assert (tmp_path / "pip.log").read_text().splitlines()[-1].split() == ["-m", "pip", "install", "-q", "tensorboard"]
    assert (node / "extras").read_text().strip() == "tensorboard"
