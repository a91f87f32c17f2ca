"""model/eval.py: HellaSwag completion scoring and validation loss, on files the tests write."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

from model.config import GPTConfig  # noqa: E402
from model.eval import (  # noqa: E402
    EvalDataError,
    ending_logprobs,
    hellaswag_scores,
    load_hellaswag,
    render_example,
    val_loss,
)
from model.gpt import GPT  # noqa: E402
from model.shards import ShardError, write_shard  # noqa: E402
from model.tokenizer import encode  # noqa: E402

THE = 262  # " the"
FAVOURITE_LOGIT = 20.0


def tiny_gpt(seed=0, block_size=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size)).eval()


def the_lover(logit: float = FAVOURITE_LOGIT):
    """A GPT whose every prediction is " the" with logit 20 (or `logit`), every other real token logit 0.

    ln_f's weight is zero, so the final hidden state is ln_f's bias (e_0) whatever the input; the
    logits are then column 0 of the (tied) embedding: 20 for " the", 0 elsewhere. So an ending's
    log-prob is ~0 per " the" token and ~-20 per other token, exactly predictable.
    """
    model = tiny_gpt()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[THE, 0] = logit
    return model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EXAMPLES = [
    {"ctx": "A man is sitting on a roof. He", "endings": ["is using wrap to wrap a pair of skis.",
     "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
    {"ctx": "A woman walks into the kitchen and", "endings": ["opens the fridge.", "sings.",
     "puts the kettle on the stove to boil water for tea.", "leaves."], "label": "2"},
    {"ctx": "The dog", "endings": ["barks.", "the the", "runs after the ball in the park.", "sleeps."], "label": 0},
    {"ctx": "", "endings": ["Then it rains.", "The end.", "Nothing happens", "Fin"], "label": 1},
    {"ctx": "word " * 60, "endings": ["one", "two three", "four five six", "seven"], "label": 2},
]


def brute_force_logprob(model, ctx_tokens, ending_tokens, block_size):
    """Log-prob of the ending, one forward per ending token, no batching, padding or masks."""
    total = 0.0
    seq = list(ctx_tokens)
    for tok in ending_tokens:
        window = torch.tensor([seq[-block_size:]])
        with torch.no_grad():
            logits, _ = model(window)
        total += F.log_softmax(logits[0, -1, :50257], dim=-1)[tok].item()
        seq.append(tok)
    return total


def test_scores_match_brute_force(tmp_path):
    model = tiny_gpt(seed=1)
    examples = load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", EXAMPLES))
    correct = correct_norm = 0
    for ex in examples:
        ctx = encode(ex["ctx"]) or [50256]
        sums, means = [], []
        for ending in ex["endings"]:
            end = encode(" " + ending)
            # The same truncation rule as documented: keep the whole ending, the newest context.
            lp = brute_force_logprob(model, ctx[-(32 - len(end)):], end, 32)
            sums.append(lp)
            means.append(lp / len(end))
        got_sums, got_counts = ending_logprobs(model, ex, "cpu")
        assert got_sums.tolist() == pytest.approx(sums, abs=1e-4)
        assert got_counts.tolist() == [len(encode(" " + e)) for e in ex["endings"]]
        correct += int(np.argmax(sums) == ex["label"])
        correct_norm += int(np.argmax(means) == ex["label"])
    got = hellaswag_scores(model, examples, "cpu")
    assert got == {"acc": correct / 5, "acc_norm": correct_norm / 5, "n": 5,
                   "correct": correct, "correct_norm": correct_norm}


def test_constructed_model_gives_certain_answers(tmp_path):
    rows = [
        # " the the the" costs ~0; every other ending costs ~20 per token: right answer, both metrics.
        {"ctx": "Pick one:", "endings": [" dog", "the the the", "cat", "bird"], "label": 1},
        {"ctx": "Again:", "endings": ["the", "dog cat", "house", "tree"], "label": 0},
        # The label points at a wrong ending: both metrics miss.
        {"ctx": "Wrong:", "endings": ["the the", "dog", "cat", "tree"], "label": 3},
        # Sum vs mean disagree: "dog" sums to -20 (mean -20); "the dog the cat" sums to -40 (mean -10).
        {"ctx": "Split:", "endings": ["dog", "the dog the cat", "dog cat", "dog cat house"], "label": 1},
    ]
    assert encode(" the dog the cat") == [THE, 3290, THE, 3797]
    examples = load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", rows))
    s = hellaswag_scores(the_lover(), examples, "cpu")
    assert (s["correct"], s["correct_norm"], s["n"]) == (2, 3, 4)
    assert s["acc"] == 0.5 and s["acc_norm"] == 0.75


def test_ranks_split_the_examples_and_counts_sum(tmp_path):
    model = tiny_gpt(seed=2)
    examples = load_hellaswag(write_jsonl(tmp_path / "hs.jsonl", EXAMPLES))
    whole = hellaswag_scores(model, examples, "cpu")
    parts = [hellaswag_scores(model, examples, "cpu", rank=r, world_size=2) for r in (0, 1)]
    assert [p["n"] for p in parts] == [3, 2]
    for key in ("n", "correct", "correct_norm"):
        assert sum(p[key] for p in parts) == whole[key]


def test_long_rows_keep_the_whole_ending():
    tokens, mask, label = render_example(EXAMPLES[4], block_size=32)
    assert tokens.shape[1] == 32 and label == 2
    for row, m, ending in zip(tokens, mask, EXAMPLES[4]["endings"]):
        end = encode(" " + ending)
        assert row[m.bool()].tolist() == end
        assert m.sum().item() == len(end)


def test_loader_limit_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "hs.jsonl", EXAMPLES)
    assert len(load_hellaswag(path, limit=2)) == 2
    assert load_hellaswag(path)[1]["label"] == 2  # the HF dataset stores labels as strings
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps({"ctx": "x", "endings": ["a"], "label": 0}) + "\n")
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: endings"):
        load_hellaswag(bad)
    with pytest.raises(EvalDataError, match="hellaswag_val.jsonl"):
        load_hellaswag(tmp_path / "missing.jsonl")


def test_val_loss_certain_and_by_hand(tmp_path):
    write_shard(tmp_path / "x_val_000000.bin", np.full(200, THE, dtype=np.uint16))
    write_shard(tmp_path / "x_train_000001.bin", np.full(200, 3290, dtype=np.uint16))
    # Only " the", predicted with logit 10 over 50256 zeros: every position's loss is log(1 + 50256 e^-10)
    # = 1.188 (a target shifted by one would give 11.19). The logits are exact (ln_f's output is e_0).
    # Bound: cross_entropy sums 50257 fp32 exps; in any order that sum's relative error is at most
    # (n-1) u = 50256 * 2^-24 = 3.0e-3 (Higham, 4.3), plus a few ulp for exp; log passes it on as an
    # absolute error; the mean of the positions adds ~1e-7. (At logit 20 each e^-20 term is below half
    # an ulp of the leading 1: whether it survives depends on the CPU's SIMD width, 9.1e-5 on AVX2
    # vs 1.04e-4 exact.)
    loss = val_loss(the_lover(10.0), tmp_path, steps=2, batch=2, T=16, device="cpu")
    assert loss == pytest.approx(math.log1p(50256 * math.exp(-10.0)), abs=3.1e-3)

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=300).astype(np.uint16)
    write_shard(tmp_path / "y.bin", tokens)
    model = tiny_gpt(seed=3)
    expected = []
    for step in range(3):  # consecutive, non-overlapping windows of batch x T, targets shifted by one
        buf = torch.from_numpy(tokens[step * 64: step * 64 + 65].astype(np.int64))
        with torch.no_grad():
            logits, _ = model(buf[:-1].view(2, 32))
        expected.append(F.cross_entropy(logits[..., :50257].reshape(-1, 50257), buf[1:]).item())
    got = val_loss(model, [tmp_path / "y.bin"], steps=3, batch=2, T=32, device="cpu")
    assert got == pytest.approx(float(np.mean(expected)), rel=1e-5)
    # Two ranks read alternate batches; their mean is the single-process mean over 4 batches.
    one = val_loss(model, [tmp_path / "y.bin"], steps=4, batch=1, T=32, device="cpu")
    two = [val_loss(model, [tmp_path / "y.bin"], steps=2, batch=1, T=32, device="cpu", rank=r, world_size=2)
           for r in (0, 1)]
    assert np.mean(two) == pytest.approx(one, rel=1e-5)
    # 300 tokens hold 4 batches of 2 x 32 (+1 target): asking for more averages those 4, never wraps around.
    assert val_loss(model, [tmp_path / "y.bin"], steps=10, batch=2, T=32, device="cpu") == pytest.approx(
        val_loss(model, [tmp_path / "y.bin"], steps=4, batch=2, T=32, device="cpu"), rel=1e-6)
    assert val_loss(model, [tmp_path / "y.bin"], steps=10, batch=2, T=32, device="cpu") != pytest.approx(
        val_loss(model, [tmp_path / "y.bin"], steps=3, batch=2, T=32, device="cpu"), rel=1e-6)


def test_val_loss_errors(tmp_path):
    with pytest.raises(EvalDataError, match="no validation shard"):
        val_loss(tiny_gpt(), tmp_path, steps=1, batch=1, T=8, device="cpu")
    write_shard(tmp_path / "small_val_000000.bin", np.arange(5, dtype=np.uint16))
    with pytest.raises(ShardError, match="at least one step of tokens"):
        val_loss(tiny_gpt(), tmp_path, steps=1, batch=1, T=8, device="cpu")


def test_eval_command_on_checkpoint_hf_dir_and_storage_url(tmp_path, monkeypatch):
    """`gpt2cloud eval` on an OUT dir (newest checkpoint), an HF dir, and val shards behind a file:// URL."""
    import dataclasses

    from typer.testing import CliRunner

    from gpt2cloud.cli import app
    from model.checkpoint import rng_state, write_checkpoint
    from model.config import TrainConfig
    from model.hf import save_hf

    monkeypatch.setenv("GPT2CLOUD_HOME", str(tmp_path / "home"))
    model = the_lover()
    cfg = TrainConfig(model=model.config)
    write_checkpoint(tmp_path / "out", 3, model, {"optimizer": {}}, {"step": 3}, [rng_state()],
                     dataclasses.asdict(cfg), keep=1)
    save_hf(model, tmp_path / "hf")
    rows = [{"ctx": "Pick:", "endings": ["dog", "the the"], "label": 1},
            {"ctx": "Pick:", "endings": ["the", "dog"], "label": 1},
            {"ctx": "Pick:", "endings": ["cat", "the dog the cat"], "label": 1}]
    hs = write_jsonl(tmp_path / "hs.jsonl", rows)
    (tmp_path / "bucket" / "data").mkdir(parents=True)
    write_shard(tmp_path / "bucket" / "data" / "x_val_000000.bin", np.full(200, THE, dtype=np.uint16))
    write_shard(tmp_path / "bucket" / "data" / "x_train_000001.bin", np.full(10, 0, dtype=np.uint16))

    runner = CliRunner()
    for target in (tmp_path / "out", tmp_path / "hf"):
        result = runner.invoke(app, ["eval", str(target), "--hellaswag", str(hs), "--limit", "3", "--json",
                                     "--val", f"file://{tmp_path / 'bucket' / 'data'}", "--val-steps", "2",
                                     "--val-batch", "2", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        r = json.loads(result.output)
        assert (r["hellaswag"]["correct"], r["hellaswag"]["correct_norm"], r["hellaswag"]["n"]) == (1, 2, 3)
        assert r["val"]["loss"] < 1e-3 and r["val"]["T"] == 32 and len(r["val"]["shards"]) == 1
    assert r["step"] is None and json.loads(runner.invoke(app, [
        "eval", str(tmp_path / "out"), "--hellaswag", str(hs), "--json"]).output)["step"] == 3

    result = runner.invoke(app, ["eval", str(tmp_path / "out")])
    assert result.exit_code == 2 and "nothing to evaluate" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "out"), "--hellaswag", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and "hellaswag_val.jsonl" in result.output
    result = runner.invoke(app, ["eval", str(tmp_path / "out"), "--hellaswag", str(hs)])
    assert result.exit_code == 0 and "acc_norm 0.6667" in result.output
