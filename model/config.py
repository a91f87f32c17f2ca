"""Plain configuration handed from `gpt2cloud/` (which validates recipes with pydantic) to `model/`.

The trainer receives one JSON file with this shape; no pydantic (and no torch) is needed on the node,
whose run script also asks this module for its price and hard time limit:

    python -m model.config price-here CONFIG.json    # USD per GPU-hour here (SKYPILOT_CLUSTER_INFO), or null
    python -m model.config hard-limit CONFIG.json    # seconds before the node kills the trainer (0: none)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # context length T
    vocab_size: int = 50257  # real tokens; the embedding is padded to padded_vocab_size
    padded_vocab_size: int = 50304  # a multiple of 64 runs faster; padded logits are never targets

    def param_count(self, padded: bool = False) -> int:
        """V*d + T*d + L*(12*d^2 + 13*d) + 2*d, the tied embedding counted once (V: the real vocabulary,
        or the padded one the embedding really has)."""
        V = self.padded_vocab_size if padded else self.vocab_size
        d, L, T = self.n_embd, self.n_layer, self.block_size
        return V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward and backward: 6N + 12*L*d*T (nanoGPT/PaLM convention,
        N at the real vocabulary). `gpt2cloud estimate` predicts with it and the trainer logs MFU with it."""
        return 6 * self.param_count() + 12 * self.n_layer * self.n_embd * self.block_size


FLOPS_FORMULA = "6N + 12*L*d*T"


# The trainer writes its one-line refusal to the file this names, as well as printing it: under
# torchrun its exit code is lost (torchrun exits 1 with a traceback of the failed child).
ERROR_FILE_ENV = "GPT2CLOUD_ERROR_FILE"
EXIT_REFUSED = 2  # the trainer's exit code for a refusal: that one `error:` line, the user's to fix

# The node's setup exits with this when torch sees fewer GPUs than the node was given (its CUDA build
# does not match the driver): gpt2cloud/launch/scripts.py runs the check, `status` explains the code.
EXIT_NO_GPU = 6

# The trainer stops a run that diverged (a non-finite loss or gradient norm, or a loss that stays far
# above its best: model/stop.py Divergence) with this code, and leaves DIVERGED_MARKER in OUT holding
# its one line (under torchrun the code is lost: the node's run script and `gpt2cloud train` read the
# marker). Not 75: a spot job must not relaunch a run that would diverge again on the same settings.
EXIT_DIVERGED = 65  # sysexits' EX_DATAERR: the run's own numbers went bad
DIVERGED_MARKER = "diverged"

# Time-based checkpoints (checkpoint_minutes): a preemption loses at most this much training, plus the
# pusher's interval (1 min) and one checkpoint's write and upload (~3.5 min for a 1.5B model's 19 GB at
# 100 MB/s): under ~15 min at any model size, whatever its step time.
DEFAULT_CHECKPOINT_MINUTES = 10.0
# The divergence guard's defaults: stop once the loss stays above LOSS_SPIKE_FACTOR x its best so far for
# LOSS_SPIKE_STEPS steps in a row. A healthy GPT-2 run's spikes stay well under 2x and pass within a few
# steps; a diverged one sits near or above ln(vocab) ~ 10.8, 3-4x its best. 20 steps cost seconds.
LOSS_SPIKE_FACTOR = 2.0
LOSS_SPIKE_STEPS = 20


class BatchError(ValueError):
    """tokens_per_step does not split into whole micro-batches over the ranks."""


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
    recipe_name: str = "custom"
    # batch
    tokens_per_step: int = 524288
    micro_batch: int = 64
    steps: int = 19073  # where this run stops (`--steps`); the schedule's length is schedule_steps
    schedule_steps: int = 0  # the cosine schedule's length; 0: steps (the trainer resolves it and checkpoints it)
    seed: int = 1337
    # optimizer and schedule
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 715
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | muon (Muon for the 2-D hidden matrices, AdamW at `lr` for the rest)
    muon_lr: float = 0.02  # the Muon group's peak lr; the schedule scales it like `lr`
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | wsd (warmup, stable at the peak, linear cooldown over the last cooldown_frac)
    cooldown_frac: float = 0.0
    # what the run writes, and how often
    val_every: int = 250
    val_steps: int = 20
    sample_every: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    sample_tokens: int = 32
    checkpoint_every: int = 5000
    # also checkpoint once this many minutes passed since the last checkpoint (0: only checkpoint_every)
    checkpoint_minutes: float = DEFAULT_CHECKPOINT_MINUTES
    keep_checkpoints: int = 3
    hellaswag_every: int = 0  # 0: never
    # execution
    compile: bool = False
    dtype: str = "auto"  # auto: bf16 on CUDA with bf16 support, fp16 on older CUDA, fp32 on CPU
    device: str = "auto"  # auto: CUDA if torch sees it, else CPU; cuda: refuse to run on CPU (rented GPUs)
    peak_flops_per_gpu: float = 0.0  # for MFU in metrics; 0 means "unknown"
    max_cost_usd: float = 0.0  # 0: no budget cap
    price_per_gpu_hour: float = 0.0  # an any_of launch: its most expensive candidate (see price_here)
    cloud_prices: dict = field(default_factory=dict)  # any_of: lowercase cloud -> USD per GPU-hour; else {}
    # --gpus H100:8,A100-80GB:8: each candidate's {"peak_flops_per_gpu", "price_per_gpu_hour", "cloud_prices"};
    # the node sets the three from the GPU it landed on (resolve_gpu), and `gpu` to its name
    gpu_candidates: dict = field(default_factory=dict)
    gpu: str = ""
    # what bills after the trainer stops, in node seconds: the final push, the teardown and the idle minutes
    # before autostop (the launch's estimate of them): the budget stop leaves room for it
    after_stop_seconds: float = 0.0
    launched_at: float = 0.0  # when this launch was planned (unix time): a node's billing cannot start before it
    max_hours: float = 0.0  # 0: no limit; else stop (with a checkpoint) before the run's wall time passes it
    stall_minutes: float = 0.0  # 0: off; else exit when no step (or eval, checkpoint) finishes for this long
    # the divergence guard (a non-finite loss always stops the run): the loss above loss_spike_factor x its
    # best for loss_spike_steps steps in a row also does; loss_spike_factor 0 turns that part off
    loss_spike_factor: float = LOSS_SPIKE_FACTOR
    loss_spike_steps: int = LOSS_SPIKE_STEPS
    trackers: list = field(default_factory=list)  # where metrics go besides metrics.jsonl (model/trackers.py)

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step: tokens_per_step / (micro_batch x block_size x world_size)."""
        per_micro_step = self.micro_batch * self.model.block_size * world_size
        if self.tokens_per_step % per_micro_step:
            raise BatchError(
                f"tokens per step ({self.tokens_per_step:,}) is not divisible by micro-batch x sequence length x "
                f"ranks ({self.micro_batch} x {self.model.block_size} x {world_size} = {per_micro_step:,})")
        return self.tokens_per_step // per_micro_step

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        model = GPTConfig(**d.pop("model", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(model=model, **d)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---- resume: the same run, or a refusal ----

# What a resumed run may set differently from the checkpoint it continues (docs/training.md#resume).
# Everything else (model, batch, optimizer, schedule, seed, precision) makes it another run.
RESUME_MAY_CHANGE = (
    "steps",  # where this run stops: earlier, or later on the same schedule
    "max_cost_usd", "price_per_gpu_hour", "cloud_prices", "after_stop_seconds", "launched_at", "max_hours",  # the caps ("raise max_cost_usd and resume")
    "micro_batch",  # follows --nproc: the same tokens per step, gradient accumulation adjusts
    "compile", "stall_minutes", "peak_flops_per_gpu", "gpu_candidates", "gpu", "trackers",  # how it runs, not what it computes
    "device",  # cuda on a node, auto for `train`: a cloud checkpoint resumes here and the other way round
    "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",  # what it writes, and how often
    "loss_spike_factor", "loss_spike_steps",  # when the guard calls it diverged: a looser bound resumes
    "val_every", "val_steps", "sample_every", "sample_prompt", "sample_tokens", "hellaswag_every",
)


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def resume_changes(saved: dict, cfg: TrainConfig) -> list[str]:
    """What `cfg` changes, beyond RESUME_MAY_CHANGE, in the run whose config (a checkpoint's, or
    OUT/config.json) is `saved`: ["lr 0.0006 -> 0.0003", ...]; [] when it is the same run.

    Both sides' schedule length is resolved (0 means steps), and a field an older config lacks counts
    as its default.
    """
    new = dataclasses.asdict(cfg)
    old = {**dataclasses.asdict(TrainConfig(model=GPTConfig(**saved.get("model", {})))), **saved}
    old["schedule_steps"] = old.get("schedule_steps") or old["steps"]
    new["schedule_steps"] = new["schedule_steps"] or new["steps"]
    changes = []
    for key in new:
        if key in RESUME_MAY_CHANGE or old.get(key) == new[key]:
            continue
        if key == "model":
            fields = [f"{k} {_shown(old['model'].get(k))} -> {_shown(v)}" for k, v in new["model"].items()
                      if old["model"].get(k) != v]
            changes.append("model " + ", ".join(fields))
        else:
            changes.append(f"{key} {_shown(old.get(key))} -> {_shown(new[key])}")
    return changes


# ---- on the node: its price and its hard time limit ----

HARD_LIMIT_GRACE_S = 600  # --max-hours: the trainer stops itself; the node kills it this much later


def resolve_gpu(cfg: TrainConfig, device_name: str) -> None:
    """A launch over GPU candidates: the one this node has (torch's device name, 'NVIDIA A100-SXM4-80GB'),
    its peak FLOPS for MFU and its prices for the cap. A candidate matches when its chip ('A100' of
    'A100-80GB') is a word of the device name and its variant ('80GB'), if any, is too; of several that
    match, the dearest. None matching: the launch's own figures stay (the dearest candidate's price, no MFU)."""
    words = set(device_name.upper().replace("-", " ").split())
    matches = [name for name in cfg.gpu_candidates
               if all(part in words for part in name.upper().split("-"))]
    if not matches:
        return
    name = max(matches, key=lambda n: cfg.gpu_candidates[n].get("price_per_gpu_hour", 0.0))
    chosen = cfg.gpu_candidates[name]
    cfg.gpu = name
    cfg.peak_flops_per_gpu = float(chosen.get("peak_flops_per_gpu", 0.0))
    cfg.price_per_gpu_hour = float(chosen.get("price_per_gpu_hour", cfg.price_per_gpu_hour))
    cfg.cloud_prices = dict(chosen.get("cloud_prices") or {})


def price_here(cfg: TrainConfig, cluster_info: str | None) -> float:
    """USD per GPU-hour on the cloud this node landed on: SkyPilot's SKYPILOT_CLUSTER_INFO (JSON) names
    it ("cloud"); an any_of launch lists each candidate's price in cfg.cloud_prices. Any other case (one
    cloud, no or unreadable cluster info, a cloud not listed) is cfg.price_per_gpu_hour, which an any_of
    launch sets to its most expensive candidate: the budget cap errs on the safe side."""
    prices = {str(k).lower(): v for k, v in (cfg.cloud_prices or {}).items()}
    if prices and cluster_info:
        try:
            cloud = str(json.loads(cluster_info).get("cloud", "")).lower()
        except (ValueError, AttributeError):  # not JSON, or not an object
            cloud = ""
        if cloud in prices:
            return float(prices[cloud])
    return cfg.price_per_gpu_hour


def hard_limit_seconds(cfg: TrainConfig) -> int:
    """The node's hard stop for a trainer that would not stop itself at max_hours: 0 (none) without max_hours."""
    if not cfg.max_hours:
        return 0
    return int(cfg.max_hours * 3600) + HARD_LIMIT_GRACE_S


def node_up(cfg: TrainConfig, proc_stat: str) -> float:
    """When this node started billing: its host's boot (btime in /proc/stat: a whole second, the same
    value every time it is read, so the attempts on one node agree), but never before this launch (in a
    container on a host that was up long before, such as a Kubernetes pod, the launch is the start)."""
    btime = next((float(line.split()[1]) for line in proc_stat.splitlines() if line.startswith("btime ")), 0.0)
    return max(btime, cfg.launched_at)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m model.config", description="What a node's run script asks of "
                                "its training config.")
    p.add_argument("what", choices=["price-here", "hard-limit", "node-up"],
                   help="price-here: USD per GPU-hour on this node's cloud (null: unknown); "
                        "hard-limit: seconds before the node kills the trainer (0: no limit); "
                        "node-up: when this node started billing (unix time)")
    p.add_argument("config", help="the TrainConfig JSON the trainer runs with")
    p.add_argument("--device-name", default="", help="price-here: the node's GPU as nvidia-smi names it (a launch "
                                                       "over GPU candidates prices the one it has)")
    args = p.parse_args(argv)
    try:
        cfg = TrainConfig.load(args.config)
    except (OSError, ValueError, TypeError) as e:
        print(f"error: config {args.config}: {e}", file=sys.stderr)
        sys.exit(2)
    if args.what == "hard-limit":
        print(hard_limit_seconds(cfg))
    elif args.what == "node-up":
        with open("/proc/stat", encoding="ascii") as f:
            print(f"{node_up(cfg, f.read()):.3f}")
    else:
        if cfg.gpu_candidates and args.device_name:
            resolve_gpu(cfg, args.device_name)  # as the trainer will (model/startup.py)
        price = price_here(cfg, os.environ.get("SKYPILOT_CLUSTER_INFO"))
        print(json.dumps(float(price)) if price else "null")  # a JSON number for the node's timeline


if __name__ == "__main__":
    main()
