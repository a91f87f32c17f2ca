"""Run recipes: YAML files validated by pydantic, resolved into the plain TrainConfig the trainer takes."""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from gpt2cloud.errors import UserError
from model.config import BatchError, GPTConfig, TrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    n_layer: PositiveInt
    n_head: PositiveInt
    n_embd: PositiveInt
    block_size: PositiveInt = 1024
    vocab_size: PositiveInt = 50257
    padded_vocab_size: PositiveInt = 50304

    def config(self) -> GPTConfig:
        """The plain model config the trainer builds (parameter count and FLOPs per token live there)."""
        return GPTConfig(**self.model_dump())

    @model_validator(mode="after")
    def _shapes(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size must be >= vocab_size")
        return self


class TrainSpec(_Strict):
    tokens_per_step: PositiveInt
    micro_batch: PositiveInt
    steps: PositiveInt
    # the cosine schedule's length when it differs from steps (a run meant to stop early); default: steps
    schedule_steps: Optional[PositiveInt] = None
    seed: int = 1337
    compile: bool = False


class OptimizerSpec(_Strict):
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(ge=0, le=1)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)


class DataSpec(_Strict):
    dataset: str
    note: Optional[str] = None


class EvalSpec(_Strict):
    val_every: PositiveInt
    val_steps: PositiveInt = 20
    sample_every: PositiveInt
    sample_prompt: str = "Hello, I'm a language model,"
    sample_tokens: PositiveInt = 32
    checkpoint_every: PositiveInt
    keep_checkpoints: PositiveInt = 3
    hellaswag_every: int = Field(default=0, ge=0)


class Recipe(_Strict):
    name: str
    description: str
    source: str
    model: ModelSpec
    train: TrainSpec
    optimizer: OptimizerSpec
    data: DataSpec
    eval: EvalSpec

    @model_validator(mode="after")
    def _batch(self):
        try:
            self.to_train_config().grad_accum(1)
        except BatchError as e:
            raise ValueError(f"train.tokens_per_step: {e}") from None
        return self

    def to_train_config(self, **overrides) -> TrainConfig:
        m, t, o, e = self.model, self.train, self.optimizer, self.eval
        cfg = TrainConfig(
            model=m.config(),
            recipe_name=self.name,
            tokens_per_step=t.tokens_per_step, micro_batch=t.micro_batch, steps=t.steps, seed=t.seed,
            schedule_steps=t.schedule_steps or t.steps,  # `--steps` stops early; the schedule keeps this
            compile=t.compile,
            lr=o.lr, min_lr_ratio=o.min_lr_ratio, warmup_steps=o.warmup_steps,
            weight_decay=o.weight_decay, beta1=o.betas[0], beta2=o.betas[1], eps=o.eps,
            grad_clip=o.grad_clip,
            val_every=e.val_every, val_steps=e.val_steps, sample_every=e.sample_every,
            sample_prompt=e.sample_prompt, sample_tokens=e.sample_tokens,
            checkpoint_every=e.checkpoint_every, keep_checkpoints=e.keep_checkpoints,
            hellaswag_every=e.hellaswag_every,
        )
        # replace() rejects a misspelt key; None means "keep the recipe's value"
        return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _bundled_dir():
    return importlib.resources.files("gpt2cloud.recipe_files")


def known_recipes() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _bundled_dir().iterdir() if p.name.endswith(".yaml"))


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "recipe"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)


def load_recipe(name_or_path: str) -> Recipe:
    """A bundled recipe by name (gpt2-124m) or a YAML file by path; UserError on anything wrong."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {path} not found" + (" (it is a directory)" if path.is_dir() else "")
                            + f"; give a recipe name ({', '.join(known_recipes())}) or a YAML file")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except (UnicodeDecodeError, OSError) as e:
            raise UserError(f"recipe {path}: not a readable UTF-8 text file ({type(e).__name__}); give a recipe "
                            "YAML file") from None
    elif name_or_path in known_recipes():
        text = (_bundled_dir() / f"{name_or_path}.yaml").read_text()
        where = name_or_path
    else:
        raise UserError(
            f"unknown recipe '{name_or_path}'; known recipes: {', '.join(known_recipes())} "
            "(or give a path to a .yaml file)"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"recipe {where}: YAML syntax error{at}: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {where}: expected a YAML mapping of recipe fields")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(f"recipe {where}: {_one_line(e)}") from None
