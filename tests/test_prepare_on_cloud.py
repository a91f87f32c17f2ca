"""`gpt2cloud data prepare --on-cloud`: the CPU task SkyPilot validates offline, and the job run for real
with `--infra local` (its scripts on this machine, shards to a real S3 server), matching a local prepare."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from sky_offline import sky_home, sky_mod  # noqa: F401  (fixtures)
from test_data_prepare import make_docs, write_jsonl
from typer.testing import CliRunner

from gpt2cloud.backends.local import node_state
from gpt2cloud.cli import app
from gpt2cloud.cost import prepare as cp
from gpt2cloud.cost.prices import Price
from gpt2cloud.data.prepare import prepare
from gpt2cloud.launch import prepare_job as pj
from gpt2cloud.processes import alive
from gpt2cloud.runs import registry
from gpt2cloud.store import open_store

SOURCE = "HuggingFaceFW/fineweb-edu:sample-10BT"
SECRET = "wJalrXUtnFEMI-prepare-job-not-a-real-secret"
KEY_ID = "AKIAPREPAREJOB000001"
HF = "hf_prepare_job_token_not_real_0123456789"
SIZES = ["--val-tokens", "1000", "--shard-tokens", "1500"]


@pytest.fixture
def creds(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", HF)
    for k in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def cli(*args):
    return CliRunner().invoke(app, ["data", "prepare", *map(str, args)])


def written(tmp_path):
    """Everything under the test's gpt2cloud home (the registry, builds, local nodes)."""
    g2 = tmp_path / ".home" / ".gpt2cloud"
    return sorted(str(p.relative_to(g2)) for p in g2.rglob("*")) if g2.exists() else []


# ---------------------------------------------------------------- the task, offline


def test_dry_run_prints_the_estimate_then_the_yaml_and_writes_nothing(sky_mod, creds):
    r = cli(SOURCE, "--out", "s3://bkt/fineweb", "--on-cloud", "--infra", "aws", "--cpus", "8", "--dry-run")
    assert r.exit_code == 0, r.output
    for secret in (SECRET, KEY_ID, HF):
        assert secret not in r.output
    # the estimate (stderr), from the config's size, the measured rate and the catalog's price
    est = cp.estimate_prepare(10e9, "", 8, local=False, hub=True, price=Price(0.384, "", per="vm"),
                              idle_minutes=pj.IDLE_MINUTES)
    assert est.seconds == cp.PROVISION_S + cp.SETUP_S + 10e9 / (cp.TOKENS_PER_CORE_S * 8) + 10e9 * 2 / 200e6
    assert est.usd == pytest.approx((est.seconds + 60) / 3600 * 0.384)
    assert "~10B (from the config's name, sample-10BT)" in r.stderr
    assert f"~{est.seconds / 60:.1f} min" in r.stderr
    assert f"~${est.usd:.2f} at $0.38/h (SkyPilot catalog: aws m6i.2xlarge on-demand)" in r.stderr
    # the YAML alone on stdout: a CPU task on AWS that removes itself, secrets named but empty
    cfg = yaml.safe_load(r.stdout)
    assert cfg["resources"]["cpus"] == "8+" and cfg["resources"]["infra"] == "aws"
    assert "accelerators" not in cfg["resources"]
    assert cfg["resources"]["autostop"] == {"idle_minutes": 1, "down": True, "wait_for": "jobs"}
    assert cfg["secrets"] == {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "HF_TOKEN": None}
    assert cfg["envs"]["GPT2CLOUD_SOURCE"] == SOURCE and cfg["envs"]["GPT2CLOUD_OUT"] == "s3://bkt/fineweb"
    assert 'gpt2cloud data prepare "$GPT2CLOUD_SOURCE"' in cfg["run"] and "gpt2cloud data upload" in cfg["run"]
    sky_mod.Task.from_yaml_config(cfg)
    assert written(creds) == []


def test_export_yaml_writes_a_cpu_task_sky_accepts(sky_mod, creds):
    out = creds / "prep.yaml"
    r = cli(SOURCE, "--out", "s3://bkt/fineweb", "--on-cloud", "--cpus", "8", "--export-yaml", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    for secret in (SECRET, KEY_ID, HF):
        assert secret not in text and secret not in r.output
    assert "sky launch THIS_FILE --secret AWS_ACCESS_KEY_ID --secret AWS_SECRET_ACCESS_KEY --secret HF_TOKEN" in text
    assert f"launch it with: sky launch {out} --secret AWS_ACCESS_KEY_ID" in " ".join(r.stderr.split())

    task = sky_mod.Task.from_yaml(str(out))
    # any_of over the enabled clouds that rent CPU-only VMs: the fixture's Lambda has only GPU machines
    assert [str(res.cloud) for res in task.resources] == ["AWS"]
    (res,) = task.resources
    assert res.accelerators is None and res.cpus == "8+" and res.memory == "16+"
    assert res.autostop_config.enabled and res.autostop_config.down
    # named, empty: `sky launch FILE --secret NAME` fills each from the environment
    assert yaml.safe_load(text)["secrets"] == {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                                               "HF_TOKEN": None}
    with sky_mod.Dag() as dag:
        dag.add(task)
    sky_mod.optimizer.Optimizer.optimize(dag, minimize=sky_mod.OptimizeTarget.COST, quiet=True)
    assert task.best_resources.instance_type == "m6i.2xlarge"
    # `sky launch FILE` ships the workdir it names: the wheel of the whole package is there
    workdir = yaml.safe_load(text)["workdir"]
    assert [p.name for p in Path(workdir).glob("*.whl")] == [pj.whole_wheel()[0]]
    assert not (creds / ".home" / ".gpt2cloud" / "runs").exists()  # nothing launched, nothing recorded


@pytest.mark.parametrize("infra, needle", [
    ("nocloud", "--infra nocloud: unknown cloud"),
    ("lambda", "--infra lambda: its catalog has no CPU-only VM"),  # the fixture's Lambda rents only GPUs
])
def test_an_infra_that_cannot_serve_a_cpu_job_is_one_line(sky_mod, creds, infra, needle):
    r = cli(SOURCE, "--out", "s3://bkt/x", "--on-cloud", "--infra", infra, "--cpus", "8", "--dry-run")
    assert r.exit_code == 2 and r.output.startswith(f"error: {needle}"), r.output
    assert len(r.output.strip().splitlines()) == 1 and written(creds) == []


# ---------------------------------------------------------------- what the VM installs


def _closure(names) -> set:
    """The distributions these requirement names pull in (as installed here), dependencies included."""
    seen, todo = set(), [re.split(r"[<>=!~\[; ]", n)[0].lower() for n in names]
    while todo:
        name = todo.pop().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[<>=!~\[; (]", r)[0].lower() for r in reqs if "extra ==" not in r]
    return seen


def test_the_vm_needs_only_the_wheel_and_its_requirements(tmp_path):
    """Install the job's wheel as the VM does, run `data prepare` and `data upload` from it, and check that
    every package they import comes from PREPARE_REQUIREMENTS (torch, SkyPilot, matplotlib never)."""
    name, data = pj.whole_wheel()
    (tmp_path / name).write_bytes(data)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(tmp_path / name)], check=True)
    src = write_jsonl(tmp_path / "corpus.jsonl", make_docs(60))
    probe = (
        "import json, runpy, sys\n"
        "sys.argv = ['gpt2cloud', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('gpt2cloud', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "import gpt2cloud\n"
        "print(json.dumps([gpt2cloud.__file__, sorted({m.split('.')[0] for m in sys.modules})]))\n"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    baseline = "import json, sys; print(json.dumps(['', sorted({m.split('.')[0] for m in sys.modules})]))"
    startup = json.loads(subprocess.run([sys.executable, "-c", baseline], env=env, cwd=tmp_path, check=True,
                                        capture_output=True, text=True).stdout)[1]  # this Python's site hooks
    used = set()
    for args in (["data", "prepare", str(src), "--out", str(tmp_path / "shards"), *SIZES, "--json"],
                 ["data", "upload", str(tmp_path / "shards"), f"file://{tmp_path}/up", "--json"]):
        p = subprocess.run([sys.executable, "-c", probe, *args], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        origin, modules = json.loads(p.stdout.strip().splitlines()[-1])
        assert origin.startswith(str(site))  # the wheel's code, not this checkout's
        used |= set(modules)
    dists = metadata.packages_distributions()
    ours = set(sys.stdlib_module_names) | set(startup) | {"gpt2cloud", "model", "__main__", "__mp_main__"}
    third_party = {d.lower().replace("_", "-") for m in used - ours if m in dists for d in dists[m]}
    allowed = _closure(pj.PREPARE_REQUIREMENTS)
    assert third_party and third_party <= allowed, third_party - allowed
    assert not {"torch", "skypilot", "matplotlib"} & third_party
    assert (tmp_path / "up" / "manifest.json").is_file()


# ---------------------------------------------------------------- for real, on this machine


@pytest.fixture
def local_s3(tmp_path, monkeypatch, s3_server, s3_bucket):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path, f"s3://{s3_bucket}/shards"


def _digests(store, manifest: dict) -> dict:
    return {f["name"]: hashlib.sha256(store.get_bytes(f["name"])).hexdigest() for f in manifest["files"]}


def test_infra_local_runs_the_job_and_matches_a_local_prepare(local_s3):
    tmp, url = local_s3
    src = tmp / "corpus"
    src.mkdir()
    write_jsonl(src / "a.jsonl", make_docs(150, seed=1))
    write_jsonl(src / "b.jsonl", make_docs(150, seed=2))

    r = cli(src, "--out", url, "--on-cloud", "--infra", "local", "--yes", *SIZES)
    assert r.exit_code == 0, r.output
    assert "prepared" in r.stdout and f"{url}/manifest.json" in r.stdout

    # the same set, byte for byte, as `data prepare` on this machine
    ref = tmp / "ref"
    prepare(str(src.resolve()), ref, val_tokens=1000, shard_tokens=1500, progress=False)
    ref_manifest = json.loads((ref / "manifest.json").read_text())
    store = open_store(url)
    manifest = json.loads(store.get_bytes("manifest.json"))
    assert len(manifest["files"]) == len(ref_manifest["files"]) > 3
    assert _digests(store, manifest) == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                         for p in ref.glob("*.bin")}
    assert {k: v for k, v in manifest.items() if k != "created"} == \
           {k: v for k, v in ref_manifest.items() if k != "created"}

    # recorded, finished, and nothing left running
    (record,) = registry.all_runs()
    assert record.state == "SUCCEEDED" and record.spec.kind == "local"
    assert node_state(record.node_dir) == "SUCCEEDED" and not alive(record.handle.pid)
    # the credentials reached the job as secrets, never a file
    assert SECRET not in "".join(p.read_text(errors="replace") for p in record.node_dir.rglob("*.sh"))


def test_a_failing_job_is_one_line_and_leaves_nothing_running(local_s3):
    tmp, url = local_s3
    bad = tmp / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json at all\n')
    r = cli(bad, "--out", url, "--on-cloud", "--infra", "local", "--yes", *SIZES)
    assert r.exit_code == 2, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: the prepare job prep-bad-") and "without a complete set" in last
    (record,) = registry.all_runs()
    assert record.state == "FAILED" and not alive(record.handle.pid)
    assert not open_store(url).exists("manifest.json")


def test_without_yes_and_no_terminal_nothing_starts(local_s3):
    tmp, url = local_s3
    write_jsonl(tmp / "c.jsonl", make_docs(20))
    r = cli(tmp / "c.jsonl", "--out", url, "--on-cloud", "--infra", "local")
    assert r.exit_code == 2 and "add --yes" in r.output
    assert registry.all_runs() == []
