"""Hugging Face format in and out: a `GPT2LMHeadModel` directory <-> our `GPT`, without transformers.

The layout (what `GPT2LMHeadModel.save_pretrained` writes):
- `config.json` with `n_layer`, `n_head`, `n_embd`, `n_positions`, `vocab_size`;
- `model.safetensors` (or shards listed in `model.safetensors.index.json`) with keys
  `transformer.wte.weight`, `transformer.h.0.attn.c_attn.weight`, ... OpenAI's own hub checkpoint
  (`gpt2`) omits the `transformer.` prefix and carries attention-mask buffers; both are accepted.

Differences from our model that the mapping bridges:
- HF's Conv1D stores weights as [in, out]; nn.Linear as [out, in]: transpose those four matrices.
- `lm_head.weight` is tied to `wte` on both sides, so the file holds it at most once.
- Our embedding is padded from 50257 to 50304 rows (a multiple of 64 runs faster). On load the
  extra rows are zero: their logits are 0, which is NOT negligible next to GPT-2's raw logits, so
  anything that scores text must slice logits to `config.vocab_size` (model/eval.py does; so does
  `GPT.generate`). On export the padding is dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt2cloud.store import atomic_write
from model.config import GPTConfig
from model.gpt import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Stored [in, out] by HF's Conv1D; every other tensor has the same shape on both sides.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers some HF checkpoints carry (the causal mask); ours builds the mask inside attention.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
PAD_MULTIPLE = 64


class HFFormatError(ValueError):
    """A directory that is not a loadable GPT-2 checkpoint; the message says what is missing."""


def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file())


def padded_size(vocab_size: int) -> int:
    """Our padded vocabulary: the next multiple of 64 (50257 -> 50304)."""
    return -(-vocab_size // PAD_MULTIPLE) * PAD_MULTIPLE


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (path / WEIGHTS_FILE).is_file():
        return load_file(str(path / WEIGHTS_FILE))
    # Large models (1.5B in fp32 is 6 GB) are saved in shards with an index naming each tensor's file.
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(str(path / shard)))
    return tensors


def _config_from_hf(cfg: dict, where: Path) -> GPTConfig:
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise HFFormatError(f"{where}: model_type is {cfg.get('model_type')!r}; only GPT-2 checkpoints load")
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFFormatError(f"{where}: activation {cfg['activation_function']!r}; our GPT uses tanh GELU (gelu_new)")
    if cfg.get("n_inner") not in (None, 4 * cfg.get("n_embd", 0)):
        raise HFFormatError(f"{where}: n_inner {cfg['n_inner']} != 4 * n_embd; our MLP is 4x wide")
    if cfg.get("tie_word_embeddings", True) is False:
        raise HFFormatError(f"{where}: tie_word_embeddings is false; our GPT ties lm_head to wte")
    try:
        vocab = int(cfg["vocab_size"])
        return GPTConfig(
            n_layer=int(cfg["n_layer"]), n_head=int(cfg["n_head"]), n_embd=int(cfg["n_embd"]),
            block_size=int(cfg["n_positions"]), vocab_size=vocab, padded_vocab_size=padded_size(vocab),
        )
    except KeyError as e:
        raise HFFormatError(f"{where}/{CONFIG_FILE}: missing field {e.args[0]!r}") from None


def load_hf(path: str | Path) -> GPT:
    """Load a Hugging Face GPT2LMHeadModel directory into our GPT (fp32, on CPU, eval mode)."""
    path = Path(path)
    if not is_hf_dir(path):
        raise HFFormatError(f"{path}: not a Hugging Face checkpoint (need {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = _config_from_hf(json.loads((path / CONFIG_FILE).read_text()), path)
    hf = _read_tensors(path)

    model = GPT(config)
    ours = model.state_dict()  # lm_head.weight appears here too, sharing wte's storage
    tied_head = hf.pop("lm_head.weight", None)
    loaded = set()
    for key, tensor in hf.items():
        name = key.removeprefix("transformer.")
        if name.endswith(IGNORED_SUFFIXES):
            continue
        ours_key = "transformer." + name
        if ours_key not in ours:
            raise HFFormatError(f"{path}: unexpected tensor {key!r}; not a GPT-2 checkpoint")
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        target = ours[ours_key]
        if name == "wte.weight":
            # The real rows; the padding rows stay zero (see module docstring).
            if tensor.shape != (config.vocab_size, config.n_embd):
                raise HFFormatError(f"{path}: {key} has shape {tuple(tensor.shape)}, config says "
                                    f"({config.vocab_size}, {config.n_embd})")
            with torch.no_grad():
                target.zero_()
                target[: config.vocab_size].copy_(tensor)
        else:
            if tensor.shape != target.shape:
                raise HFFormatError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)  # copy_ also converts bf16/fp16 files to our fp32
        loaded.add(ours_key)

    missing = sorted(k for k in ours if k not in loaded and k != "lm_head.weight")
    if missing:
        raise HFFormatError(f"{path}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if tied_head is not None and not torch.equal(tied_head.to(ours["transformer.wte.weight"].dtype),
                                                 ours["transformer.wte.weight"][: config.vocab_size]):
        raise HFFormatError(f"{path}: lm_head.weight differs from wte; our GPT needs them tied")
    return model.eval()


def unwrap(model) -> GPT:
    """The plain GPT under DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while not isinstance(model, GPT):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"expected a GPT model, got {type(model).__name__}")
        model = inner
    return model


def hf_config(config: GPTConfig) -> dict:
    """config.json for transformers' GPT2LMHeadModel describing our architecture."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_inner": None,
        "vocab_size": config.vocab_size,
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which our GPT uses
        "initializer_range": 0.02,
        # Our trainer uses no dropout; keep fine-tuning in transformers the same by default.
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def save_hf(model, path: str | Path) -> Path:
    """Write config.json + model.safetensors in GPT2LMHeadModel's layout (fp32, unpadded vocab)."""
    from safetensors.torch import save_file

    gpt = unwrap(model)
    config = gpt.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, tensor in gpt.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte; transformers re-ties it on load
        tensor = tensor.detach().to("cpu", torch.float32)
        if key == "transformer.wte.weight":
            tensor = tensor[: config.vocab_size]
        elif key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        # safetensors refuses views and shared storage: give each tensor its own contiguous copy.
        tensors[key] = tensor.contiguous().clone()
    # Write under temporary names, then rename: a crash never leaves a half-written checkpoint.
    tmp_weights = path / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp_weights), metadata={"format": "pt"})
    tmp_weights.replace(path / WEIGHTS_FILE)
    atomic_write(path / CONFIG_FILE, json.dumps(hf_config(config), indent=2) + "\n")
    return path
