"""Run recipes: YAML files validated by pydantic, resolved into the plain TrainConfig the trainer takes."""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from gpt2cloud.cost.optimizers import OPTIMIZERS
from gpt2cloud.errors import UserError
from model.config import (DEFAULT_CHECKPOINT_MINUTES, LOSS_SPIKE_FACTOR, LOSS_SPIKE_STEPS, BatchError, GPTConfig,
                          TrainConfig)


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
    # the divergence guard (model/stop.py): a non-finite loss always stops the run; so does the loss above
    # loss_spike_factor x its best for loss_spike_steps steps in a row (0: only non-finite losses)
    loss_spike_factor: float = Field(default=LOSS_SPIKE_FACTOR, ge=0, allow_inf_nan=False)
    loss_spike_steps: PositiveInt = LOSS_SPIKE_STEPS

    @model_validator(mode="after")
    def _spike_bound(self):
        if 0 < self.loss_spike_factor <= 1:
            raise ValueError(f"loss_spike_factor {self.loss_spike_factor:g}: must be above 1 (a multiple of the "
                             "best loss so far), or 0 to stop only on a non-finite loss")
        return self


class OptimizerSpec(_Strict):
    # adamw: AdamW for every parameter. muon: Muon (Newton-Schulz orthogonalized momentum) for the 2-D
    # hidden matrices of the blocks, AdamW with the fields above the muon_* ones for the embeddings,
    # biases and LayerNorms (model/muon.py).
    name: Literal[tuple(OPTIMIZERS)] = "adamw"  # cost/optimizers.py: the optimizers the trainer knows
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(ge=0, le=1)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0)
    muon_lr: float = Field(default=0.02, gt=0)
    muon_momentum: float = Field(default=0.95, ge=0, lt=1)
    muon_weight_decay: float = Field(default=0.0, ge=0)
    # cosine: warmup, then cosine decay to lr * min_lr_ratio over the whole run. wsd (warmup-stable-decay):
    # warmup, flat at the peak, then a linear cooldown to lr * min_lr_ratio over the last cooldown_frac.
    schedule: Literal["cosine", "wsd"] = "cosine"
    cooldown_frac: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _fields_of_the_chosen_ones(self):
        # a field the chosen optimizer or schedule would silently ignore is a mistake worth naming
        if self.name != "muon":
            given = sorted(f for f in self.model_fields_set if f.startswith("muon_"))
            if given:
                raise ValueError(f"{', '.join(given)} only apply with name: muon (this recipe uses {self.name})")
        if self.schedule != "wsd" and "cooldown_frac" in self.model_fields_set:
            raise ValueError("cooldown_frac only applies with schedule: wsd")
        if self.schedule == "wsd" and self.cooldown_frac == 0:
            raise ValueError("schedule wsd needs cooldown_frac in (0, 1): the share of the steps spent "
                             "decaying the lr")
        return self


class DataSpec(_Strict):
    dataset: str
    note: Optional[str] = None


MAX_CHECKPOINT_MINUTES = 7 * 24 * 60  # a week: more is a typo (a run checkpoints at its end anyway)


class EvalSpec(_Strict):
    val_every: PositiveInt
    val_steps: PositiveInt = 20
    sample_every: PositiveInt
    sample_prompt: str = "Hello, I'm a language model,"
    sample_tokens: PositiveInt = 32
    checkpoint_every: PositiveInt
    # also checkpoint once this many minutes passed since the last checkpoint, so that a preemption loses
    # at most that much (plus one upload) at any model size; 0: only every checkpoint_every steps
    checkpoint_minutes: float = Field(default=DEFAULT_CHECKPOINT_MINUTES, ge=0, le=MAX_CHECKPOINT_MINUTES,
                                      allow_inf_nan=False)
    keep_checkpoints: PositiveInt = 3
    hellaswag_every: int = Field(default=0, ge=0)
    # where the metrics also go (model/trackers.py TRACKERS: tensorboard, wandb, trackio); `--tracker` replaces
    # the list. The names are checked where the recipe becomes a run (train, launch): cost/ cannot import
    # the trainer's registry
    trackers: list[str] = Field(default_factory=list)

    @field_validator("trackers")
    @classmethod
    def _tracker_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"{name!r} is not a tracker name (e.g. tensorboard, wandb, trackio)")
        if len(set(names)) != len(names):
            raise ValueError(f"{', '.join(names)} names one twice")
        return names


class Recipe(_Strict):
    name: str
    description: str
    source: str
    # A fast recipe shortens a faithful one: the same model and tokenizer, another optimizer and schedule,
    # fewer tokens. It names the recipe it shortens, the share of its tokens it trains on, and the
    # measurement that share rests on (all three, or none).
    faster_than: Optional[str] = None
    token_ratio: Optional[float] = Field(default=None, gt=0, lt=1)
    basis: Optional[str] = None
    # what the evidence supports, [low, high]: the share of the faithful tokens the new optimizer may need, from
    # the most favourable reading of the evidence to the least; token_ratio (the steps) lies inside it. The
    # estimate shows the saving as this range. Default: [token_ratio, token_ratio].
    token_ratio_range: Optional[tuple[float, float]] = None
    # a GPU comparison at this recipe's own size and batch (the fast run's val loss curve against the faithful
    # run's): the ratio it measured and where (a run, a report); both or neither
    measured_token_ratio: Optional[float] = Field(default=None, gt=0)
    measured_source: Optional[str] = None
    # the same ratio measured by this project's CPU benchmark (benchmarks/bench_optim.py: Muon's steps to
    # reach AdamW's final val loss / AdamW's steps, mean over seeds); informative, steps follow token_ratio
    bench_optim_step_ratio: Optional[float] = Field(default=None, gt=0)
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

    @model_validator(mode="after")
    def _shortening(self):
        named = {"faster_than": self.faster_than, "token_ratio": self.token_ratio, "basis": self.basis}
        missing = [k for k, v in named.items() if v is None or v == ""]
        if len(missing) < 3 and missing:
            raise ValueError(f"a fast recipe gives faster_than, token_ratio and basis together; missing "
                             f"{', '.join(missing)}")
        extras = [k for k in ("token_ratio_range", "measured_token_ratio", "measured_source", "bench_optim_step_ratio")
                  if getattr(self, k) not in (None, "")]
        if extras and self.faster_than is None:
            raise ValueError(f"{', '.join(extras)} belong(s) to a fast recipe (one with faster_than)")
        if (self.measured_token_ratio is None) != (self.measured_source in (None, "")):
            raise ValueError("measured_token_ratio and measured_source go together: the ratio a GPU comparison "
                             "measured and where it is recorded")
        if self.token_ratio_range is not None and self.token_ratio is not None:
            low, high = self.token_ratio_range
            if not 0 < low <= high <= 1:
                raise ValueError(f"token_ratio_range [{low:g}, {high:g}]: low <= high, both in (0, 1]")
            if not low <= self.token_ratio <= high:
                raise ValueError(f"token_ratio {self.token_ratio:g} lies outside token_ratio_range [{low:g}, {high:g}]: "
                                 "the steps must be one of the ratios the evidence supports")
        if self.faster_than == self.name:
            raise ValueError(f"faster_than: a recipe cannot shorten itself ({self.name})")
        return self

    @property
    def is_fast(self) -> bool:
        return self.faster_than is not None

    @property
    def ratio_range(self) -> tuple[float, float] | None:
        """A fast recipe's [low, high] token ratio (its token_ratio alone when it gives no range)."""
        if not self.is_fast:
            return None
        return tuple(self.token_ratio_range) if self.token_ratio_range else (self.token_ratio, self.token_ratio)

    def trackers_for(self, flag: Optional[list[str]]) -> tuple[list[str], str]:
        """The run's trackers and how to name where they came from in an error: `--tracker` (repeatable;
        given, it replaces the recipe's list), else the recipe's eval.trackers. The caller checks the names
        against the trainer's registry (model/trackers.py refusal)."""
        if flag:
            return list(dict.fromkeys(flag)), "--tracker"
        return list(self.eval.trackers), f"recipe {self.name}: eval.trackers:"

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
            optimizer=o.name, muon_lr=o.muon_lr, muon_momentum=o.muon_momentum,
            muon_weight_decay=o.muon_weight_decay, schedule=o.schedule, cooldown_frac=o.cooldown_frac,
            val_every=e.val_every, val_steps=e.val_steps, sample_every=e.sample_every,
            sample_prompt=e.sample_prompt, sample_tokens=e.sample_tokens,
            checkpoint_every=e.checkpoint_every, checkpoint_minutes=e.checkpoint_minutes,
            keep_checkpoints=e.keep_checkpoints, hellaswag_every=e.hellaswag_every, trackers=list(e.trackers),
            loss_spike_factor=t.loss_spike_factor, loss_spike_steps=t.loss_spike_steps,
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
    """A bundled recipe by name (gpt2-124m) or a YAML file by path; UserError on anything wrong. A fast
    recipe is checked against the faithful recipe it shortens."""
    recipe, where = _read_recipe(name_or_path)
    if recipe.is_fast:
        _check_shortening(recipe, faithful_recipe(recipe, where), where)
    return recipe


def _read_recipe(name_or_path: str) -> tuple[Recipe, str]:
    """The recipe validated on its own, and how to name it in an error."""
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
        return Recipe.model_validate(data), where
    except ValidationError as e:
        raise UserError(f"recipe {where}: {_one_line(e)}") from None


def faithful_recipe(fast: Recipe, where: str | None = None) -> Recipe:
    """The recipe a fast one shortens (its faster_than: a bundled name or a YAML path)."""
    where = where or fast.name
    try:
        faithful, _ = _read_recipe(fast.faster_than)  # not load_recipe: a loop of fast recipes must end here
    except UserError as e:
        raise UserError(f"recipe {where}: faster_than: {e}") from None
    if faithful.is_fast:
        raise UserError(f"recipe {where}: faster_than: {fast.faster_than} is itself a fast recipe; name the "
                        "faithful recipe it shortens")
    return faithful


def fast_recipe_of(recipe: Recipe) -> Recipe | None:
    """The bundled fast recipe that shortens this one, when this one is a bundled faithful recipe as shipped
    (a user's edited copy under the same name has no fast sibling: its steps or model may differ)."""
    fast_name = _fast_names().get(recipe.name)
    if fast_name is None or recipe != load_recipe(recipe.name):
        return None
    return load_recipe(fast_name)


@functools.cache
def _fast_names() -> dict[str, str]:
    """faithful recipe name -> the bundled fast recipe naming it in faster_than."""
    found = {}
    for name in known_recipes():
        data = yaml.safe_load((_bundled_dir() / f"{name}.yaml").read_text())
        if isinstance(data, dict) and data.get("faster_than"):
            found[data["faster_than"]] = name
    return found


# steps are whole numbers: tokens may miss token_ratio x the faithful tokens by this much
TOKEN_RATIO_TOLERANCE = 0.01


def _check_shortening(fast: Recipe, faithful: Recipe, where: str) -> None:
    """A fast recipe trains the faithful recipe's GPT-2 (same model, tokenizer and batch) on token_ratio of its
    tokens; anything else would make the side-by-side dollars compare two different things."""
    if fast.model != faithful.model:
        diff = ", ".join(f"{k} {v} vs {getattr(faithful.model, k)}" for k, v in fast.model
                         if v != getattr(faithful.model, k))
        raise UserError(f"recipe {where}: model: a fast recipe keeps the architecture of {faithful.name} ({diff})")
    if fast.train.tokens_per_step != faithful.train.tokens_per_step:
        raise UserError(f"recipe {where}: train.tokens_per_step: a fast recipe keeps {faithful.name}'s batch "
                        f"({faithful.train.tokens_per_step:,} tokens per step); only steps change")
    want = fast.token_ratio * faithful.train.steps
    if abs(fast.train.steps - want) > TOKEN_RATIO_TOLERANCE * want:
        raise UserError(f"recipe {where}: train.steps: {fast.train.steps:,} is not token_ratio {fast.token_ratio:g} "
                        f"of {faithful.name}'s {faithful.train.steps:,} steps (about {round(want):,})")
