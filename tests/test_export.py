"""`gpt2cloud export --hf`: transformers loads the directory offline, tokenizes like GPT-2, and agrees on logits.

Exporting needs no transformers (only the tests that load the result with it do: the `transformers`
fixture skips them without it, and CI fails on a skip).
"""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from gpt2cloud.cli import app
from gpt2cloud.checkpoints.hf_tokenizer import bytes_to_unicode, vocab_and_merges
from model.config import GPTConfig, TrainConfig
from model.gpt import GPT
from model.tokenizer import encode, get_encoding

PROMPT = "Hello, I'm a language model,"
PROMPT_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]
runner = CliRunner()


def save_run(out_dir, step=7, seed=0):
    """An OUT dir with one checkpoint written by the trainer's own checkpoint code."""
    from model.checkpoint import rng_state, write_checkpoint

    torch.manual_seed(seed)
    cfg = TrainConfig(model=GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64), recipe_name="gpt2-tiny")
    model = GPT(cfg.model)
    write_checkpoint(out_dir, step, model, {"optimizer": {}}, {"step": step}, [rng_state()],
                     dataclasses.asdict(cfg), keep=2)
    return model.eval()


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = save_run(root / "out")
    result = runner.invoke(app, ["export", str(root / "out"), "--hf", str(root / "hf"), "--json"])
    assert result.exit_code == 0, result.output
    return model, root / "hf", json.loads(result.output)


def test_export_writes_a_complete_directory(exported):
    _, hf_dir, info = exported
    assert info["step"] == 7 and info["checkpoint"].endswith("step_000007")
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt",
                 "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (hf_dir / name).is_file(), name
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["model_max_length"] == 64
    assert "README.md" in info["files"]  # the model card (tests/test_hub_push.py checks what it says)
    marker = json.loads((hf_dir / "gpt2cloud_export.json").read_text())
    assert marker["complete"] and sorted(marker["files"]) == info["files"]


def test_a_readme_of_yours_in_an_export_is_refused_and_kept(exported, tmp_path):
    """The card is ours only while it carries its marker line: a README.md the user wrote is theirs."""
    import shutil

    _, hf_dir, info = exported
    mine = tmp_path / "hf"
    shutil.copytree(hf_dir, mine)
    (mine / "README.md").write_text("# my notes on this model\n")
    result = runner.invoke(app, ["export", info["checkpoint"], "--hf", str(mine)])
    assert result.exit_code == 2 and "README.md without gpt2cloud's card marker" in result.output, result.output
    assert (mine / "README.md").read_text() == "# my notes on this model\n"


def test_transformers_loads_model_and_logits_equal_ours(transformers, exported):
    model, hf_dir, _ = exported
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    idx = torch.tensor([PROMPT_IDS + [50256, 0, 50255]])
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    # fp32 rounding of two implementations (tests/test_hf.py LOGITS_ATOL): observed 2.4e-7; the last matmul alone
    # may differ by 64 * 2^-24 * sum|h_i w_i| (1.33) = 5e-6. A transposed or dropped tensor moves logits by ~0.4.
    torch.testing.assert_close(theirs, ours[..., :50257], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", ["GPT2Tokenizer", "GPT2TokenizerFast"])
def test_transformers_tokenizer_matches_gpt2(transformers, exported, cls):
    _, hf_dir, _ = exported
    tok = getattr(transformers, cls).from_pretrained(hf_dir)
    assert tok.encode(PROMPT) == PROMPT_IDS
    text = "Ünïcödé 日本語 😀 tabs\t\tand   spaces\n\nnew lines 12345 don't   it's"
    assert tok.encode(text) == encode(text)
    assert tok.decode(encode(text)) == text
    assert tok.eos_token_id == 50256 and tok.convert_ids_to_tokens(50256) == "<|endoftext|>"


def test_vocab_and_merges_shape():
    vocab, merges = vocab_and_merges(get_encoding()._mergeable_ranks)
    assert len(vocab) == 50257 and len(merges) == 50000  # GPT-2: 256 bytes + 50,000 merges + EOT
    assert merges[0] == "Ġ t"  # the first merge of GPT-2's merges.txt: space + t
    assert vocab["Hello"] == 15496 and vocab["Ġlanguage"] == 3303
    assert len(set(bytes_to_unicode().values())) == 256


def test_export_of_a_non_checkpoint_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["export", str(tmp_path), "--hf", str(tmp_path / "hf")])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "hf").exists()
