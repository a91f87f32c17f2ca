"""The bundled GPT-2 tokenizer works offline and matches OpenAI's GPT-2 token ids."""

import pytest

from model.tokenizer import EOT_TOKEN, VOCAB_SIZE, decode, encode, get_encoding


def test_builds_offline_from_bundled_ranks(monkeypatch):
    # No network: any attempt to download the merges would fail here.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    get_encoding.cache_clear()
    enc = get_encoding()
    assert enc.name == "gpt2" and enc.n_vocab == VOCAB_SIZE == 50257


@pytest.mark.parametrize("text, ids", [
    ("Hello, I'm a language model,", [15496, 11, 314, 1101, 257, 3303, 2746, 11]),
    ("Hello world", [15496, 995]),
])
def test_known_ids(text, ids):
    assert encode(text) == ids


def test_end_of_text_token():
    enc = get_encoding()
    assert EOT_TOKEN == 50256 == enc.eot_token
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN]
    assert encode("<|endoftext|>") != [EOT_TOKEN]  # ordinary text: never the special token


@pytest.mark.parametrize("text", ["Hello world", "Ünïcode ✓ €, tabs\tand\nnewlines  ", "日本語のテキスト", ""])
def test_round_trip(text):
    assert decode(encode(text)) == text
