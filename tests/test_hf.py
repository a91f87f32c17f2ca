"""model/hf.py against transformers' own GPT2LMHeadModel, offline, both directions.

Only the tests that compare with transformers need it (the `transformers` fixture skips them without
it, and CI fails on a skip); model/hf.py itself needs only torch and safetensors.
"""

import json

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT
from model.hf import HFFormatError, load_hf, save_hf

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=50257)
# Our GPT and transformers' round differently (nn.Linear vs Conv1D's addmm, fused tanh GELU vs gelu_new's
# formula): each is within 4e-7 of an fp64 run (|ours - theirs| <= 3e-7, 1 or 2 threads). The last matmul alone,
# in any summation order, may differ by K * 2^-24 * sum|h_i w_i| = 64 * 6e-8 * 1.35 = 5e-6; 1e-5 leaves room for
# the layers before it. A dropped bias, a transposed matrix or positions shifted by one move logits by 0.4-1.
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model(transformers):
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY)).eval()
    # Random init leaves biases and LayerNorms at 0/1; perturb them so a dropped or misplaced bias shows.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50257, (2, 40), generator=g)


def test_load_hf_matches_transformers_logits(hf_model, tokens, tmp_path):
    hf_model.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.padded_vocab_size == 50304 and ours.config.block_size == 64
    assert ours.lm_head.weight is ours.transformer.wte.weight
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got, _ = ours(tokens)
    assert got.shape[-1] == 50304
    torch.testing.assert_close(got[..., :50257], expected, atol=LOGITS_ATOL, rtol=0)
    assert torch.count_nonzero(ours.transformer.wte.weight[50257:]) == 0  # padding rows are zero


def test_save_hf_loads_in_transformers_with_equal_logits(transformers, tokens, tmp_path):
    torch.manual_seed(2)
    ours = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)).eval()
    save_hf(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["vocab_size"] == 50257
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_slice("transformer.wte.weight").get_shape() == [50257, 64]
        assert f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape() == [64, 192]  # Conv1D: [in, out]

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected, _ = ours(tokens)
        got = hf(tokens).logits
    torch.testing.assert_close(got, expected[..., :50257], atol=LOGITS_ATOL, rtol=0)


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(3)
    ours = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    back = load_hf(save_hf(ours, tmp_path))
    for key, value in ours.state_dict().items():  # copies and transposes, no arithmetic: bit-exact
        if key.endswith("wte.weight") or key == "lm_head.weight":
            value = value[:50257]
            torch.testing.assert_close(back.state_dict()[key][:50257], value, atol=0, rtol=0)
        else:
            torch.testing.assert_close(back.state_dict()[key], value, atol=0, rtol=0)


def test_openai_hub_layout_without_prefix_and_with_mask_buffers(hf_model, tokens, tmp_path):
    """OpenAI's `gpt2` on the hub stores `h.0...` keys (no `transformer.`) plus attn.bias masks."""
    from safetensors.torch import save_file

    state = {k.removeprefix("transformer."): v.contiguous().clone()
             for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf_model.config.to_json_file(str(tmp_path / "config.json"))
    ours = load_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0][..., :50257], hf_model(tokens).logits, atol=LOGITS_ATOL, rtol=0)


def test_sharded_hf_dir_loads_through_load_model(hf_model, tokens, tmp_path):
    """A dir with model.safetensors.index.json and shards (no model.safetensors) is an HF-format dir too."""
    from model.checkpoint import load_model, resolve_checkpoint

    hf_model.save_pretrained(tmp_path, max_shard_size="5MB")  # wte alone is 12.9 MB: several shards
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert resolve_checkpoint(tmp_path) == tmp_path
    ours = load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[0][..., :50257], hf_model(tokens).logits, atol=LOGITS_ATOL, rtol=0)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(HFFormatError, match="not a Hugging Face checkpoint"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(HFFormatError, match="only GPT-2"):
        load_hf(tmp_path)
