"""What each node of an `--infra local` run gets (gpt2cloud/backends/local.py), without starting one: GPUs of
its own (CUDA_VISIBLE_DEVICES), none for CPU ranks, the run's own --notify and tracker packages only; and
the launch's refusal of more GPUs than this machine has (gpt2cloud/launch/plan.py)."""

from __future__ import annotations

import pytest
from run_helpers import local_record

from gpt2cloud.backends import local
from gpt2cloud.backends.local import LocalBackend, node_gpu_env
from gpt2cloud.errors import UserError
from gpt2cloud.launch import plan as plan_mod
from gpt2cloud.names import NODE_EXTRAS_ENV
from model.notify import NOTIFY_ENV


def test_each_node_of_a_gpu_type_sees_its_own_slice_and_cpu_ranks_none():
    assert [node_gpu_env("H100", 2, r, None) for r in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "4,5"}]
    # this shell already narrowed the GPUs: the slices are of those
    assert node_gpu_env("A100", 1, 1, "3, 5,7") == {"CUDA_VISIBLE_DEVICES": "5"}
    assert node_gpu_env("A100", 2, 0, "GPU-a,GPU-b,GPU-c,GPU-d") == {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}
    for rank in (0, 1):
        assert node_gpu_env("CPU", 4, rank, None) == node_gpu_env("CPU", 4, rank, "0,1") == {"CUDA_VISIBLE_DEVICES": ""}


def _started_envs(tmp_path, monkeypatch, secrets: dict, **spec) -> list[dict]:
    """The env each node's driver would get (start_node replaced: nothing is started)."""
    envs = []

    def fake_start(d, task_cfg, env):
        envs.append(env)
        return 1000 + len(envs), None

    monkeypatch.setattr(local, "start_node", fake_start)
    rec = local_record(tmp_path, "nodes", handle=None, **spec)
    LocalBackend().start(rec, {"workdir": str(tmp_path), "setup": "", "run": "", "envs": {"GPT2CLOUD_RUN_ID": "nodes"}},
                         secrets)
    return envs


def test_start_gives_each_node_its_gpus_and_never_a_stray_notify_or_extras(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(NOTIFY_ENV, "https://hooks.example.com/stray")  # left in this shell by something else
    monkeypatch.setenv(NODE_EXTRAS_ENV, "wandb")
    envs = _started_envs(tmp_path, monkeypatch, {}, gpu_type="H100", gpus_per_node=2, nodes=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    assert all(NOTIFY_ENV not in e and NODE_EXTRAS_ENV not in e for e in envs)
    # the run's own (its secret, its task's env) reach every node
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    envs = _started_envs(tmp_path, monkeypatch, {NOTIFY_ENV: "https://hooks.example.com/mine"},
                         gpu_type="CPU", gpus_per_node=3, nodes=2)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["", ""]
    assert [e[NOTIFY_ENV] for e in envs] == ["https://hooks.example.com/mine"] * 2


def _cuda(monkeypatch, count: int):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_local_launch_of_more_gpus_than_this_machine_has_is_refused(monkeypatch):
    _cuda(monkeypatch, 2)
    with pytest.raises(UserError, match=r"--gpus H100:2 --nodes 2: 4 GPUs, but this machine has 2.*--gpus H100:1"):
        plan_mod.plan(recipe="gpt2-tiny", gpus="H100:2", nodes=2, infra="local")
    with pytest.raises(UserError, match=r"3 GPUs, but this machine has 2.*--nodes 2 --gpus H100:1"):
        plan_mod.plan(recipe="gpt2-tiny", gpus="H100:1", nodes=3, infra="local")
    plan_mod.check_local_gpus("H100:1", 1, 2)  # fits: one each
    plan_mod.check_local_gpus("H100:2", 2, 1)
    _cuda(monkeypatch, 0)  # no CUDA: the ranks run on CPU, nothing to share
    plan_mod.check_local_gpus("H100:2", 2, 4)
