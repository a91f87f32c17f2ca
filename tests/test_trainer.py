"""model/train.py end to end on CPU: real torchrun with gloo, a tiny model with a 256-token vocabulary.

The reference runs are made once per module and the other tests compare against them:
- `runs`: 1 process with gradient accumulation 2, and 2 DDP ranks x 1 micro-step (120 steps);
- `accum_runs`: 1 process x accumulation 8, and 2 ranks x accumulation 4 (20 steps).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from gpt2cloud.processes import kill_process_tree
from model import checkpoint as ckpt
from model.metrics import truncate_after
from trainer_helpers import (REPO, FakeClock, env, losses, make_shards, read_metrics, run_trainer, tiny_config,
                             train_on_clock, trainer_cmd, write_config)

STEPS = 120  # ~2 s; long enough that a kill after step 25 lands well before the end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    data = make_shards(root / "data")
    config = write_config(root / "config.json", tiny_config(steps=STEPS, val_every=10, checkpoint_every=10,
                                                            keep_checkpoints=3))
    run_trainer(config, data, root / "one", None)  # 1 process: 256 tokens/step = 2 micro-steps of 4 x 32
    run_trainer(config, data, root / "two", 2)  # 2 ranks x 1 micro-step
    return {"root": root, "data": data, "config": config, "one": root / "one", "two": root / "two"}


def _weights(out, step=STEPS):
    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    """The largest difference between two sets of weights, the attention key biases aside.

    Their gradient is exactly zero (a bias on the keys adds the same q.b to all of a query's scores,
    which softmax ignores), so what they get is rounding noise, and AdamW, dividing by its RMS, turns
    noise of order 1e-10 into steps of order lr: they drift apart between two equal runs while changing
    nothing the model computes.
    """
    assert a.keys() == b.keys()

    def comparable(key, t):
        if key.endswith("attn.c_attn.bias"):  # [query | key | value] biases
            n = t.shape[0] // 3
            return torch.cat([t[:n], t[2 * n:]])
        return t

    return max((comparable(k, a[k]) - comparable(k, b[k])).abs().max().item() for k in a)


def test_two_ranks_equal_one_rank_with_accumulation(runs):
    one, two = losses(runs["one"]), losses(runs["two"])
    assert sorted(one) == list(range(1, STEPS + 1))
    # Bitwise equal by construction (observed 0, 1 or 2 threads): each micro-batch's gradient is computed alike,
    # halving it (loss / 2, DDP's / world) is exact and a sum of 2 terms has one order. 1e-5 is margin: summing the
    # same tokens in other groups (micro_batch 2) moves these 120 steps by 5e-7 (losses) and 8e-7 (weights);
    # lr off by 1% by 9e-3 and 4e-2, a missing all-reduce by more.
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5
    assert _max_diff(_weights(runs["one"]), _weights(runs["two"])) < 1e-5
    assert one[STEPS] < one[1] - 1.0  # it learns the repeating pattern
    # validation reads the same batches on 1 and 2 ranks, so val loss is comparable too
    val_one, val_two = ({r["step"]: r["val_loss"] for r in read_metrics(runs[k]) if "val_loss" in r} for k in ("one", "two"))
    assert val_one.keys() == val_two.keys() and len(val_one) == STEPS // 10
    assert max(abs(val_one[s] - val_two[s]) for s in val_one) < 1e-5  # 2 halved losses, summed: bitwise equal


def test_metrics_and_checkpoints_written(runs):
    records = read_metrics(runs["two"])
    start, end = records[0], records[-1]
    assert start["event"] == "start" and start["world_size"] == 2 and start["resumed_from"] is None
    assert start["config"]["tokens_per_step"] == 256 and start["grad_accum"] == 1
    assert all(isinstance(r["time"], float) for r in records)  # when each line was written
    final = losses(runs["two"])[STEPS]
    assert end == {"event": "end", "step": STEPS, "final_loss": final, "time": end["time"]}
    step = next(r for r in records if r.get("step") == 3 and "loss" in r)
    assert set(step) == {"step", "loss", "lr", "grad_norm", "step_seconds", "tokens_per_second", "mfu",
                         "tokens_seen", "elapsed_seconds", "time"}
    assert step["tokens_seen"] == 3 * 256 and step["mfu"] is None  # no peak FLOPS given, no price
    assert [r["step"] for r in records if "val_loss" in r] == list(range(10, STEPS + 1, 10))
    assert not any("sample" in r for r in records)  # vocabulary 256: no GPT-2 text to sample
    ckpts = sorted(p.name for p in (runs["two"] / "checkpoints").iterdir())
    assert ckpts == ["step_000100", "step_000110", "step_000120"]  # keep_checkpoints 3
    final = runs["two"] / "checkpoints" / "step_000120"
    assert {"rng_rank0.pt", "rng_rank1.pt", "manifest.json"} <= {p.name for p in final.iterdir()}
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["data"]["shard"].startswith("tiny_train_")


def test_sigkill_midway_then_resume_is_exact(runs):
    """A SIGKILL at any moment (mid-step, mid-checkpoint) costs the steps since the newest complete
    checkpoint, whichever that is: a checkpoint cut short before its manifest does not count."""
    out = runs["root"] / "killed"
    proc = subprocess.Popen(trainer_cmd(runs["config"], runs["data"], out, 2), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and any('"step": 25,' in line for line in metrics.read_text().splitlines()):
                break
            time.sleep(0.02)
    finally:
        kill_process_tree(proc.pid)  # SIGKILL: torchrun and both workers (they have sessions of their own)
    proc.wait()
    records = read_metrics(out)
    assert not any(r.get("event") == "end" for r in records), "the run finished before it was killed"
    killed_at = max(r["step"] for r in records if "loss" in r)
    assert 25 <= killed_at < STEPS
    newest = ckpt.latest_checkpoint(out)  # complete: manifest written and every file as it says
    assert newest is not None
    ckpt.verify_checkpoint(newest)
    resume_step = int(newest.name.removeprefix("step_"))
    # step 20's checkpoint was complete before step 21 began; one being written at the kill may not be
    assert 20 <= resume_step <= killed_at and resume_step % 10 == 0

    run_trainer(runs["config"], runs["data"], out, 2, "--resume", "auto")
    starts = [r for r in read_metrics(out) if r.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [None, resume_step]  # never again from step 1
    reference, resumed = losses(runs["two"]), losses(out)  # losses() also asserts no step is logged twice
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # the same ranks' arithmetic from an exactly restored state: bitwise equal (observed 0); 1e-5 as above
    assert max(abs(reference[s] - resumed[s]) for s in reference) < 1e-5
    assert _max_diff(_weights(runs["two"]), _weights(out)) < 1e-5


def test_resume_on_another_world_size(runs):
    """A checkpoint of the 1-process run, continued on 2 ranks, follows the 1-process run exactly."""
    out = runs["root"] / "regrown"
    shutil.copytree(runs["one"], out)
    for step in (110, 120):
        shutil.rmtree(out / "checkpoints" / f"step_{step:06d}")
    p = run_trainer(runs["config"], runs["data"], out, 2)
    assert "written by 1 ranks, this run has 2" in p.stdout
    reference, resumed = losses(runs["one"]), losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # 2 ranks x 1 from the 1 x 2 run's exact state: bitwise equal, as in the first test (observed 0)
    assert max(abs(reference[s] - resumed[s]) for s in range(101, STEPS + 1)) < 1e-5
    assert _max_diff(_weights(runs["one"]), _weights(out)) < 1e-5


def test_budget_cap_stops_with_a_checkpoint(runs, tmp_path, monkeypatch):
    """On a clock where every step takes exactly 1 s at $1/s, the cap is met deterministically.

    The trainer stops before a step when the cost so far plus 1.5x its slowest recent iteration would
    pass the cap: with a $10.60 cap that is after step 10 (9 + 1.5 <= 10.6 < 10 + 1.5).
    """
    cap, clock = 10.6, FakeClock(step_seconds=1.0)

    def config(cap):
        return write_config(tmp_path / f"budget-{cap}.json", tiny_config(
            steps=1_000_000, price_per_gpu_hour=3600.0, max_cost_usd=cap, checkpoint_every=10_000))

    out = tmp_path / "budget"
    train_on_clock(config(cap), runs["data"], out, clock, monkeypatch)
    records = read_metrics(out)
    stop, steps = records[-1], [r for r in records if "loss" in r]
    assert stop["event"] == "budget_stop" and stop["step"] == steps[-1]["step"] == 10
    # float64 seconds / 3600 * $3600: within an ulp (approx's default rel 1e-6 is margin); a wrong factor gives 2x
    assert [r["cost_usd"] for r in steps] == pytest.approx(list(range(1, 11)))
    assert all(r["cost_usd"] <= cap for r in steps) and stop["cost_usd"] <= cap  # never past the cap
    assert steps[-1]["cost_usd"] + 1.0 > cap  # and not stopped early: step 11 would have passed it
    assert (out / "checkpoints" / "step_000010" / "manifest.json").exists()  # a checkpoint at the stop
    assert not any(r.get("event") == "end" for r in records)

    # resumed with the same cap: the budget is spent, so no new step, no new checkpoint, still within it
    train_on_clock(config(cap), runs["data"], out, clock, monkeypatch)
    again = read_metrics(out)
    assert again[-1]["event"] == "budget_stop" and again[-1]["step"] == 10 and again[-1]["cost_usd"] <= cap
    assert [r["step"] for r in again if "loss" in r] == list(range(1, 11))

    # as the stop message says: raise the cap and resume to continue, up to the new cap
    train_on_clock(config(cap + 5), runs["data"], out, clock, monkeypatch)
    more = read_metrics(out)
    assert more[-1]["event"] == "budget_stop" and more[-1]["step"] == 15
    assert [r["step"] for r in more if "loss" in r] == list(range(1, 16))
    assert all(r["cost_usd"] <= cap + 5 for r in more if "loss" in r)


def test_resume_never_refuses_an_existing_run(runs):
    p = run_trainer(runs["config"], runs["data"], runs["one"], None, "--resume", "never", check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "--resume auto" in p.stderr


def test_corrupt_newest_checkpoint_is_refused_by_name(runs):
    out = runs["root"] / "corrupt"
    shutil.copytree(runs["one"], out)
    bad = out / "checkpoints" / "step_000120" / "optimizer.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    p = run_trainer(runs["config"], runs["data"], out, None, "--steps", str(STEPS + 10), check=False)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(bad) in last and "sha256" in last and "delete" in last


def test_full_vocabulary_run_samples_and_scores_hellaswag(runs, tmp_path):
    """With GPT-2's vocabulary the trainer also writes text samples and HellaSwag scores."""
    from model.config import GPTConfig

    examples = [{"ctx": "The cat sat on the", "endings": ["mat.", "moon.", "idea.", "sky."], "label": 0},
                {"ctx": "She opened the", "endings": ["door.", "sing.", "blue.", "ran."], "label": 0},
                {"ctx": "Water is", "endings": ["wet.", "dry.", "loud.", "square."], "label": 0}]
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    (data / "hellaswag_val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    config = write_config(tmp_path / "full.json", tiny_config(
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32), steps=2, val_every=2, sample_every=2,
        sample_tokens=4, checkpoint_every=2, hellaswag_every=2, sample_prompt="Once upon a time"))
    run_trainer(config, data, tmp_path / "out", None)
    records = read_metrics(tmp_path / "out")
    (sample,) = [r for r in records if "sample" in r]
    assert sample["step"] == 2 and sample["sample"].startswith("Once upon a time")
    (hs,) = [r for r in records if "hellaswag_acc_norm" in r]
    assert hs["step"] == 2 and hs["hellaswag_n"] == 3 and 0 <= hs["hellaswag_acc_norm"] <= 1


# ---- gradient accumulation, world-size changes, torch.compile, a kill during the node's push ----

ACCUM_STEPS = 20


@pytest.fixture(scope="module")
def accum_runs(runs):
    """1024 tokens per step of 4 x 32-token micro-batches: 1 process x 8 micro-steps, 2 ranks x 4."""
    root = runs["root"] / "accum"
    data = make_shards(root / "data", train_tokens=(12000, 12000), val_tokens=1000)
    config = write_config(root / "config.json", tiny_config(steps=ACCUM_STEPS, tokens_per_step=1024, val_every=10,
                                                            checkpoint_every=10, keep_checkpoints=3))
    run_trainer(config, data, root / "one", None)
    run_trainer(config, data, root / "two", 2)
    return {"root": root, "data": data, "config": config, "one": root / "one", "two": root / "two"}


def test_two_ranks_accumulating_4_equal_one_rank_accumulating_8(accum_runs):
    """Each step reads the same 8 micro-batches either way (micro-step k of rank r reads batch 2k + r)
    and averages their gradients: over the ranks (DDP's all-reduce), over the micro-steps (loss / accum)."""
    one, two = losses(accum_runs["one"]), losses(accum_runs["two"])
    starts = [read_metrics(accum_runs[k])[0] for k in ("one", "two")]
    assert [(s["world_size"], s["grad_accum"]) for s in starts] == [(1, 8), (2, 4)]
    assert sorted(one) == sorted(two) == list(range(1, ACCUM_STEPS + 1))
    # The 8 gradients (and losses) are summed in another order: g0 + g1 + ... + g7 vs (g0 + g2 + g4 + g6) +
    # (g1 + g3 + g5 + g7). Losses (~5): an 8-term sum errs by <= 7 x 2^-24 x 5 = 2e-6 each (observed <= 2 ulp, 1e-6).
    # Weights: a few ulp of gradient per step, but AdamW divides by sqrt(v), so an element whose gradient nearly
    # cancels moves by lr x its rounding / sqrt(v): after 20 steps 1.2e-7 to 3.3e-6 over 40 model seeds (median
    # 2e-7), 1 or 2 threads; 3e-5 is 10x the worst. lr off by 1% moves losses by 8e-3 and weights by 9e-3.
    assert max(abs(one[s] - two[s]) for s in one) < 1e-5
    assert _max_diff(_weights(accum_runs["one"], ACCUM_STEPS), _weights(accum_runs["two"], ACCUM_STEPS)) < 3e-5
    assert one[ACCUM_STEPS] < one[1] - 1.0  # it learns
    # the key biases _max_diff leaves out change nothing: both models compute the same logits
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [ckpt.load_model(accum_runs[k])(x)[0] for k in ("one", "two")]
    # A logit is h . w over 32 features with sum|h_i| <= 33 (ln_f's output): weights d apart move it by <= ~33 d,
    # ~6 d in practice. Observed <= 1.6e-5 over 40 seeds (1 of 40 fails the old 1e-5); lr off by 1%: 6e-2.
    assert (logits[0] - logits[1]).abs().max().item() < 1e-4


def test_resume_from_two_ranks_onto_one_is_exact(accum_runs, tmp_path):
    """A 2-rank run stopped after its step-10 checkpoint, resumed on 1 rank, equals the uninterrupted runs.

    What is comparable, and why exactly: the checkpoint keeps the data position and the trainer keeps
    tokens per step, so the resumed process takes 8 micro-steps where each of the 2 ranks took 4. Every
    step still reads the same 8 micro-batches and takes the mean of their gradients (see the test above),
    so steps 11-20 are the same arithmetic up to float summation order as in the uninterrupted 2-rank run
    (and the uninterrupted 1-rank run). No dropout or other randomness enters a step, so the RNG state of
    the rank that is gone matters to nothing. Losses agree to 1e-5 and final weights to 3e-5.
    """
    out = tmp_path / "shrunk"
    shutil.copytree(accum_runs["two"], out)
    shutil.rmtree(out / "checkpoints" / "step_000020")  # as if stopped after step 10's checkpoint
    truncate_after(out / "metrics.jsonl", 13)  # and it had logged a few more steps before it died
    p = run_trainer(accum_runs["config"], accum_runs["data"], out, None)
    assert "written by 2 ranks, this run has 1" in p.stdout and "gradient accumulation now 8" in p.stdout
    starts = [r for r in read_metrics(out) if r.get("event") == "start"]
    assert [(s["world_size"], s["grad_accum"], s["resumed_from"]) for s in starts] == [(2, 4, None), (1, 8, 10)]
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, ACCUM_STEPS + 1))
    for reference in ("two", "one"):
        expected = losses(accum_runs[reference])
        # steps 11-20 (or 1-10) summed in the other run's order: the bounds of the test above (observed 4.8e-7, 6.4e-7)
        assert max(abs(expected[s] - resumed[s]) for s in range(11, ACCUM_STEPS + 1)) < 1e-5, reference
        assert _max_diff(_weights(accum_runs[reference], ACCUM_STEPS), _weights(out, ACCUM_STEPS)) < 3e-5, reference


COMPILED_RUN = """
import sys
from model import train
train.main(sys.argv[1:])
from torch._dynamo.utils import counters
print("DYNAMO", counters["stats"]["unique_graphs"], bool(counters["inductor"]))
"""


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(runs, tmp_path):
    """compile: true (`--compile`): Inductor compiles the tiny model (35-60 s cold on 2 CPU cores, a few
    seconds with Inductor's cache warm), it trains, and the checkpoint holds the raw module's weights:
    no `_orig_mod.` prefix, loadable into a plain GPT."""
    config = write_config(tmp_path / "compiled.json", tiny_config(steps=3, compile=True, val_every=0,
                                                                  checkpoint_every=3))
    out = tmp_path / "compiled"
    p = subprocess.run([sys.executable, "-c", COMPILED_RUN, "--config", str(config), "--data", str(runs["data"]),
                        "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    graphs, inductor = p.stdout.strip().splitlines()[-1].split()[1:]
    assert int(graphs) >= 1 and inductor == "True"  # dynamo captured the model, Inductor built it
    records = read_metrics(out)
    assert records[0]["config"]["compile"] is True
    trained = losses(out)
    assert sorted(trained) == [1, 2, 3] and all(math.isfinite(v) for v in trained.values())
    weights = _weights(out, 3)
    assert weights and not [k for k in weights if "_orig_mod" in k]
    assert set(weights) == set(_weights(runs["one"]))  # the same keys as an uncompiled run's
    model = ckpt.load_model(out)  # strict about missing and unexpected keys
    assert model.transformer.wte.weight.shape[0] == 256


def test_kill_between_checkpoint_push_and_metrics_push_leaves_no_gap(runs, tmp_path, monkeypatch):
    """The node's pusher is killed right after a checkpoint is published in the bucket, before any
    later upload. A fresh node pulls that checkpoint and the bucket's metrics and resumes: every step
    appears once, with the loss of an uninterrupted run (model/sync.py pushes the metrics first)."""
    from gpt2cloud.store import open_store
    from model import sync

    node, url = tmp_path / "node", (tmp_path / "bucket" / "run").as_uri()
    shutil.copytree(runs["one"], node)  # steps 1-120, checkpoints 100, 110, 120: the node as it goes
    shutil.copy(node / "metrics.jsonl", tmp_path / "all-metrics.jsonl")
    for step in (110, 120):
        shutil.move(node / "checkpoints" / f"step_{step:06d}", tmp_path / f"step_{step:06d}")
    truncate_after(node / "metrics.jsonl", 103)
    pusher = sync.Pusher(node, url)
    pusher.push_once()  # checkpoint 100, metrics to step 103

    shutil.move(tmp_path / "step_000110", node / "checkpoints" / "step_000110")
    shutil.copy(tmp_path / "all-metrics.jsonl", node / "metrics.jsonl")
    truncate_after(node / "metrics.jsonl", 112)  # the trainer went on to step 112, then the node died

    class Killed(BaseException):
        pass

    real_put = pusher.store.put_bytes

    def put_bytes(key, data):
        real_put(key, data)
        if key == "checkpoints/step_000110/manifest.json":
            raise Killed()  # the process dies the moment the checkpoint is published: nothing after it is sent

    monkeypatch.setattr(pusher.store, "put_bytes", put_bytes)
    with pytest.raises(Killed):
        pusher.push_once()
    assert sync.remote_checkpoints(open_store(url))[0][-1] == (110, "step_000110")

    fresh = tmp_path / "fresh"
    assert sync.pull(url, fresh) == 0
    assert ckpt.latest_checkpoint(fresh).name == "step_000110"
    run_trainer(runs["config"], runs["data"], fresh, None)
    resumed, reference = losses(fresh), losses(runs["one"])  # losses() asserts each step is logged once
    assert sorted(resumed) == list(range(1, STEPS + 1)), "a gap in the resumed run's metrics"
    # 1 process both, from an exactly restored state: bitwise equal (observed 0); 1e-5 as in the first test
    assert max(abs(reference[s] - resumed[s]) for s in reference) < 1e-5
