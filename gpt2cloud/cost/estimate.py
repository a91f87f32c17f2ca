"""What a recipe costs on given hardware: parameters, FLOPs, time, GPU-hours, dollars and memory.

Plain arithmetic, no torch: `gpt2cloud estimate` must answer instantly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields

from gpt2cloud.cost import phases
from gpt2cloud.cost.hardware import default_mfu, gpu_spec, known_gpus
from gpt2cloud.cost.network import GRADIENT_BYTES_PER_PARAM, interconnect_for, step_comm
from gpt2cloud.cost.optimizers import OPTIMIZERS
from gpt2cloud.cost.prices import Price, table_price
from gpt2cloud.cost.recipes import Recipe, fast_recipe_of, faithful_recipe
from gpt2cloud.errors import MAX_MICRO_BATCH, MAX_STEPS, MAX_TOKENS_PER_STEP, UserError, positive
from model.config import FLOPS_FORMULA, BatchError, GPTConfig, TrainConfig

GIB = 2**30
# Memory per GPU of one eager training step (model/train.py train_step: bf16 autocast forward, backward,
# clip, fused AdamW), fitted to benchmarks/bench_memory.py's trace of the real model (fake tensors, every
# storage the step creates and frees) for 124M..1558M at micro-batches 4..64, where it agrees within ~1%.
# Per parameter (of the padded model): fp32 weights 4, autocast's cached bf16 copies 2, fp32 gradients 4,
# AdamW's two fp32 moments 8. The gradients are alive during the forward from the second micro-step on.
# DDP: the trainer turns on gradient_as_bucket_view, so the all-reduce buckets are the .grad tensors and
# DDP adds no second copy of the gradients (without it, add another 4 bytes per parameter).
WEIGHT_BYTES_PER_PARAM = 4
BF16_WEIGHT_BYTES_PER_PARAM = 2
# GRADIENT_BYTES_PER_PARAM (4, fp32) comes from gpt2cloud/cost/network.py, whose all-reduce moves those bytes.
# The optimizer's state: gpt2cloud/cost/optimizers.py (AdamW's two fp32 moments: 8 bytes per parameter).
# Saved for the backward pass, per token per layer per unit of width, with flash attention (no T x T
# scores), no dropout: the fp32 residual stream at both LayerNorm inputs (4 + 4), the bf16 LayerNorm
# outputs fed to the matmuls (2 + 2), q/k/v (6), the attention output (2), the MLP's c_fc output and
# its GELU (8 + 8) = 36. (Korthikanti et al. 2022 count 34 with 16-bit LayerNorm inputs and dropout
# masks; autocast keeps this model's residual stream in fp32.)
ACTIVATION_BYTES_PER_TOKEN_LAYER = 36
# Outside the layers, per token per unit of width: ln_f's fp32 input (4) and its bf16 output (2).
ACTIVATION_BYTES_PER_TOKEN_EXTRA = 6
# Per token per (padded) vocabulary entry, at the start of the backward (the step's high-water mark,
# with every activation still saved): the fp32 log-softmax saved by the loss (4), the gradient the
# loss hands it (4) and the gradient it computes (4). (The forward's bf16 logits and their fp32 copy,
# 2 + 4, are freed by then; the model no longer returns the logits in training.)
LOGIT_BYTES_PER_TOKEN_VOCAB = 12
# Not in the trace: the CUDA context (~0.5 GiB), cuBLAS workspaces, NCCL buffers and the caching
# allocator's fragmentation; also the ~3 GiB we keep spare when choosing a recipe's micro-batch.
FIXED_OVERHEAD_GIB = 3.0


@dataclass
class Memory:
    weights_gib: float  # fp32 master weights
    bf16_weights_gib: float  # autocast's bf16 copies of the weights
    gradients_gib: float  # fp32; DDP with gradient_as_bucket_view adds no bucket copy
    optimizer_gib: float  # AdamW: two fp32 moments; Muon: one fp32 momentum for the hidden matrices
    activations_gib: float
    logits_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return sum(asdict(self).values())

    @property
    def traced_gib(self) -> float:
        """What benchmarks/bench_memory.py's trace measures: everything but the fixed overhead."""
        return self.total_gib - self.overhead_gib


def memory_per_gpu(m: GPTConfig, micro_batch: int, optimizer: str = "adamw") -> Memory:
    n = m.param_count(padded=True)
    tokens = micro_batch * m.block_size
    return Memory(
        weights_gib=WEIGHT_BYTES_PER_PARAM * n / GIB,
        bf16_weights_gib=BF16_WEIGHT_BYTES_PER_PARAM * n / GIB,
        gradients_gib=GRADIENT_BYTES_PER_PARAM * n / GIB,
        optimizer_gib=OPTIMIZERS[optimizer].state_bytes(m) / GIB,
        activations_gib=(ACTIVATION_BYTES_PER_TOKEN_LAYER * m.n_layer + ACTIVATION_BYTES_PER_TOKEN_EXTRA)
        * m.n_embd * tokens / GIB,
        logits_gib=LOGIT_BYTES_PER_TOKEN_VOCAB * m.padded_vocab_size * tokens / GIB,
        overhead_gib=FIXED_OVERHEAD_GIB,
    )


def max_micro_batch(m: GPTConfig, memory_gib: float, optimizer: str = "adamw") -> int:
    """The largest micro-batch whose memory fits (0 if not even 1 does)."""
    fixed = memory_per_gpu(m, 0, optimizer).total_gib
    per_sample = memory_per_gpu(m, 1, optimizer).total_gib - fixed
    return max(0, int((memory_gib - fixed) // per_sample))


@dataclass
class Estimate:
    recipe: str
    params: int
    flops_per_token: int
    flops_formula: str
    tokens: int
    steps: int
    tokens_per_step: int
    micro_batch: int
    grad_accum: int
    gpu_type: str
    gpus_per_node: int
    nodes: int
    gpus: int
    peak_tflops_per_gpu: float
    mfu: float
    mfu_source: str
    tokens_per_second: float
    step_seconds: float
    total_flops: float
    wall_hours: float
    gpu_hours: float
    price_per_gpu_hour: float
    price_source: str
    cost_usd: float
    memory_gb_per_gpu: float  # GiB
    gpu_memory_gb: float  # GiB
    fits: bool
    max_micro_batch: int
    memory: dict
    # the whole bill (gpt2cloud/cost/phases.py): wall_hours and cost_usd above are the training loop's
    breakdown_hours: dict = field(default_factory=dict)
    all_in_hours: float = 0.0
    all_in_cost_usd: float = 0.0
    controller_usd: float = 0.0  # spot: SkyPilot's managed-jobs controller VM, beside the node
    micro_batch_note: str = ""  # why the micro-batch differs from the recipe's, when it does
    phase_sources: dict = field(default_factory=dict)
    # the optimizer: adamw, or muon (Muon for the hidden matrices, AdamW for the rest)
    optimizer: str = "adamw"
    # Newton-Schulz: the busiest rank's FLOPs x GPUs (every GPU waits for the busiest); not in total_flops
    optimizer_flops_per_step: float = 0.0
    # what the optimizer adds to each step (cost/optimizers.py step_seconds): its FLOPs at the MFU plus a fixed
    # time per matrix, on the busiest rank (Muon: 1/GPUs of the matrices each)
    optimizer_seconds_per_step: float = 0.0
    optimizer_matrices_per_gpu: int = 0
    # a fast recipe: the faithful recipe it shortens, on the same hardware and price (the SIBLING_FIELDS
    # of its estimate), the share of its tokens and the measurement that share rests on
    faithful: dict | None = None
    token_ratio: float | None = None  # the share the recipe's steps train on
    basis: str = ""
    bench_optim_step_ratio: float | None = None
    # the saving as a range: the token ratios the evidence supports [low, high], the fast run's all-in dollars
    # at each end (the steps it would take), and a GPU comparison at this size when there is one
    token_ratio_range: list | None = None
    range_all_in_cost_usd: list | None = None
    measured_token_ratio: float | None = None
    measured_source: str = ""
    # a faithful recipe with a bundled fast one: that one's summary, on the same hardware and price
    fast: dict | None = None
    # the gradient all-reduce (gpt2cloud/cost/network.py): step_seconds = compute_seconds + comm_exposed_seconds
    interconnect_gbps: float = 0.0  # between nodes: the node's NICs together, line rate
    interconnect_source: str = ""
    interconnect_key: str = ""  # "cloud instance" (what a measured link efficiency belongs to; "" unknown)
    link_efficiency: float = 0.0  # NCCL's share of line rate
    link_efficiency_source: str = ""
    gradient_bytes: float = 0.0  # fp32 gradients, all-reduced once per optimizer step
    compute_seconds: float = 0.0  # the step at the calibrated MFU (intra-node all-reduce included)
    intra_node_comm_seconds: float = 0.0  # NVLink all-reduce: inside compute_seconds, not added
    comm_seconds: float = 0.0  # the all-reduce between nodes per step, before overlap (0 on one node)
    comm_overlap: float = 0.0  # the share of comm_seconds hidden behind the backward
    comm_exposed_seconds: float = 0.0  # what the step pays for it
    scaling_efficiency: float = 1.0  # compute_seconds / step_seconds: tokens/s over nodes x one node's

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Estimate":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def estimate(
    recipe: Recipe,
    gpu_type: str = "H100",
    gpus_per_node: int = 8,
    nodes: int = 1,
    price: Price | float | None = None,
    mfu: float | None = None,
    steps: int | None = None,
    tokens_per_step: int | None = None,
    micro_batch: int | None = None,
    check_batch: bool = True,
    local: bool = False,
    spot: bool = False,
    idle_minutes: float = 10.0,
    price_source: str | None = None,
    side_by_side: bool = True,
    checkpoint_minutes: float | None = None,
    *,
    interconnect_gbps: float | None = None,
    image: str = "",
) -> Estimate:
    """The estimate of a recipe on given hardware. side_by_side: a fast recipe also gets its faithful
    recipe's estimate on the same hardware and price (est.faithful), and a faithful recipe with a bundled
    fast one that one's (est.fast). interconnect_gbps: the network between nodes (--interconnect-gbps);
    None: the table's for the price's cloud and instance, as the launch with this --image asks for it
    (gpt2cloud/cost/network.py)."""
    if nodes < 1:
        raise UserError(f"--nodes {nodes}: need at least 1 node")
    if not isinstance(price, Price):
        positive("--price", price, "2.99")
    positive("--mfu", mfu, "0.45", upper=1)
    positive("--interconnect-gbps", interconnect_gbps, "3200")
    check_sizes(steps, tokens_per_step, micro_batch, nodes)

    cfg = recipe.to_train_config(steps=steps, tokens_per_step=tokens_per_step, micro_batch=micro_batch,
                                 checkpoint_minutes=checkpoint_minutes)  # None: the recipe's
    note = ""
    if micro_batch is None:  # the recipe's micro-batch: use the largest one that divides and fits instead
        spec = gpu_spec(gpu_type)
        cfg, note = choose_micro_batch(cfg, gpus_per_node * nodes, spec.memory_gib, spec.name)
    est = estimate_config(recipe.name, cfg, gpu_type, gpus_per_node, nodes, price=price, mfu=mfu,
                           check_batch=check_batch, local=local, spot=spot, idle_minutes=idle_minutes,
                           price_source=price_source, interconnect_gbps=interconnect_gbps, image=image)
    est.micro_batch_note = note
    if not side_by_side:
        return est

    def sibling(other: Recipe, other_steps: int | None) -> dict:
        e = estimate(other, gpu_type, gpus_per_node, nodes, price, mfu, other_steps, tokens_per_step, micro_batch,
                     check_batch, local, spot, idle_minutes, price_source, side_by_side=False,
                     checkpoint_minutes=checkpoint_minutes, interconnect_gbps=interconnect_gbps, image=image)
        return {k: getattr(e, k) for k in SIBLING_FIELDS}

    def saving(fast: Recipe, mine: dict, faithful_steps: int) -> dict:
        """The fast recipe's token ratio as a range, with its all-in dollars at each end (the steps it takes)."""
        ends = [mine["all_in_cost_usd"] if r == fast.token_ratio else
                sibling(fast, min(MAX_STEPS, max(1, round(r * faithful_steps))))["all_in_cost_usd"]
                for r in fast.ratio_range]
        return {"token_ratio": fast.token_ratio, "basis": fast.basis, "token_ratio_range": list(fast.ratio_range),
                "range_all_in_cost_usd": ends, "measured_token_ratio": fast.measured_token_ratio,
                "measured_source": fast.measured_source or ""}

    if recipe.is_fast:
        est.bench_optim_step_ratio = recipe.bench_optim_step_ratio
        # --steps on a fast recipe: the faithful run it shortens is steps / token_ratio long
        est.faithful = sibling(faithful_recipe(recipe),
                               min(MAX_STEPS, round(steps / recipe.token_ratio)) if steps else None)
        for k, v in saving(recipe, {"all_in_cost_usd": est.all_in_cost_usd}, est.faithful["steps"]).items():
            setattr(est, k, v)
    elif (fast := fast_recipe_of(recipe)) is not None:
        est.fast = sibling(fast, max(1, round(steps * fast.token_ratio)) if steps else None)
        est.fast.update(saving(fast, est.fast, est.steps))
    return est


def as_price(price: Price | float | None, source: str | None, gpu: str) -> Price:
    """A Price from what the caller has: the resolved one, a bare number (--price), or nothing (the table's)."""
    if isinstance(price, Price):
        return price
    if price is not None:
        return Price(float(price), source or "--price")
    listed = table_price(gpu)
    if listed is None:
        raise UserError(f"no default price for {gpu}; pass --price USD_PER_GPU_HOUR")
    return listed


# what a side-by-side shows of the other recipe: its size, time, dollars and memory
SIBLING_FIELDS = ("recipe", "optimizer", "steps", "tokens", "micro_batch", "wall_hours", "gpu_hours", "cost_usd",
                  "all_in_hours", "all_in_cost_usd", "memory_gb_per_gpu", "fits")


def fit_micro_batch(cfg: TrainConfig, gpus: int, memory_gib: float | None) -> int | None:
    """The largest micro-batch, at most the config's, that divides tokens per step over the GPUs and
    fits in their memory (memory_gib None: not known, divisibility only); None when none does."""
    for m in range(cfg.micro_batch, 0, -1):
        if (cfg.tokens_per_step % (m * cfg.model.block_size * gpus) == 0
                and (memory_gib is None or memory_per_gpu(cfg.model, m, cfg.optimizer).total_gib <= memory_gib)):
            return m
    return None


def choose_micro_batch(cfg: TrainConfig, gpus: int, memory_gib: float | None, device: str = "GPU",
                       ranks: str = "GPUs") -> tuple[TrainConfig, str]:
    """The one micro-batch rule (estimate, launch and `train`): the config with the largest micro-batch,
    at most its own, that divides tokens per step over `gpus` ranks and fits in `memory_gib` per rank;
    and a note saying why when it changed ("" when it did not, or when none fits: the caller refuses)."""
    chosen = fit_micro_batch(cfg, gpus, memory_gib)
    if not chosen or chosen == cfg.micro_batch:
        return cfg, ""
    note = (f"micro-batch {chosen} instead of the recipe's {cfg.micro_batch}, the largest that "
            f"{'fits in ' + device + ' memory and ' if memory_gib is not None and chosen < cfg.micro_batch else ''}"
            f"divides {cfg.tokens_per_step:,} tokens per step over {gpus} {ranks}")
    return dataclasses.replace(cfg, micro_batch=chosen), note


def check_sizes(steps: int | None, tokens_per_step: int | None, micro_batch: int | None, nodes: int = 1) -> None:
    """The size options: whole, positive, within what the trainer can run."""
    positive("--steps", steps, "19073", upper=MAX_STEPS)
    positive("--tokens-per-step", tokens_per_step, "524288", upper=MAX_TOKENS_PER_STEP)
    positive("--micro-batch", micro_batch, "16", upper=MAX_MICRO_BATCH)
    positive("--nodes", nodes, "2", upper=1024)


def check_fits(recipe: Recipe, gpu_type: str, gpus: int, micro_batch: int | None = None,
               tokens_per_step: int | None = None) -> None:
    """Refuse a recipe that does not fit in the GPU's memory at the micro-batch the launch would use (the
    one rule above), before anything is asked of a cloud."""
    spec = gpu_spec(gpu_type)
    cfg = recipe.to_train_config(tokens_per_step=tokens_per_step, micro_batch=micro_batch)
    if micro_batch is None:
        cfg, _ = choose_micro_batch(cfg, gpus, spec.memory_gib, spec.name)
    need = memory_per_gpu(cfg.model, cfg.micro_batch, cfg.optimizer).total_gib
    if need <= spec.memory_gib:
        return
    most = max_micro_batch(cfg.model, spec.memory_gib, cfg.optimizer)
    raise UserError(
        f"{recipe.name} needs ~{round(need, 2):.1f} GiB per GPU with micro-batch {cfg.micro_batch}, but {spec.name} has "
        f"{spec.memory_gib:g} GiB; pick a GPU with more memory (`gpt2cloud estimate {recipe.name} --compare`)"
        + (f" or a recipe whose micro-batch is at most {most}" if most else " (it does not fit even at micro-batch 1)"))


def estimate_config(name: str, cfg: TrainConfig, gpu_type: str, gpus_per_node: int, nodes: int = 1,
                    price: Price | float | None = None, mfu: float | None = None, check_batch: bool = True,
                    local: bool = False, spot: bool = False, idle_minutes: float = 10.0,
                    price_source: str | None = None, interconnect_gbps: float | None = None,
                    image: str = "") -> Estimate:
    """The estimate of a resolved training config (a recipe with its overrides, or a run's own config).
    price: the launch's resolved Price, or a number (price_source names where it came from, default
    --price); without one, the table's. interconnect_gbps: the network between nodes; None: the table's
    (for the launch's --image: a cloud machine image gets no fabric)."""
    spec = gpu_spec(gpu_type)
    m, steps, tokens_per_step, micro_batch = cfg.model, cfg.steps, cfg.tokens_per_step, cfg.micro_batch
    gpus = gpus_per_node * nodes
    try:
        grad_accum = cfg.grad_accum(gpus)
    except BatchError as err:
        if check_batch:
            raise UserError(f"{err}; change --tokens-per-step, --micro-batch or the GPU count") from None
        grad_accum = max(1, tokens_per_step // (micro_batch * m.block_size * gpus))

    params = m.param_count()
    fpt = m.flops_per_token()
    if mfu is None:
        cal = default_mfu(spec.name, params)
        mfu, mfu_source = cal.mfu, cal.source
    else:
        mfu_source = "--mfu"
    resolved = as_price(price, price_source, spec.name)
    price, price_source = resolved.per_gpu(gpus_per_node), resolved.source

    tokens = steps * tokens_per_step
    # what the optimizer adds beyond the model's FLOPs (Muon: Newton-Schulz, split over the GPUs, and a fixed
    # time per matrix): the busiest rank's, which every rank waits for
    opt = OPTIMIZERS[cfg.optimizer]
    optimizer_flops = opt.step_flops(m, gpus) * gpus
    optimizer_seconds = opt.step_seconds(m, gpus, mfu * spec.peak_bf16_tflops * 1e12)
    compute_seconds = fpt * tokens_per_step / (mfu * spec.peak_bf16_tflops * 1e12 * gpus) + optimizer_seconds
    # the calibrated MFU already pays for the all-reduce inside a node; between nodes, what the backward
    # does not hide adds to the step
    net = interconnect_for(resolved, spec.name, interconnect_gbps, image)
    comm = step_comm(m, spec.name, gpus_per_node, nodes, compute_seconds, grad_accum, net)
    step_seconds = compute_seconds + comm.exposed_seconds
    tokens_per_second = tokens_per_step / step_seconds
    wall_seconds = tokens / tokens_per_second
    gpu_hours = wall_seconds / 3600 * gpus
    mem = memory_per_gpu(m, micro_batch, cfg.optimizer)
    est = Estimate(
        recipe=name, params=params, flops_per_token=fpt, flops_formula=FLOPS_FORMULA,
        tokens=tokens, steps=steps, tokens_per_step=tokens_per_step, micro_batch=micro_batch,
        grad_accum=grad_accum,
        gpu_type=spec.name, gpus_per_node=gpus_per_node, nodes=nodes, gpus=gpus,
        peak_tflops_per_gpu=spec.peak_bf16_tflops, mfu=mfu, mfu_source=mfu_source,
        tokens_per_second=tokens_per_second, step_seconds=step_seconds,
        total_flops=float(fpt) * tokens, wall_hours=wall_seconds / 3600, gpu_hours=gpu_hours,
        price_per_gpu_hour=price, price_source=price_source, cost_usd=gpu_hours * price,
        memory_gb_per_gpu=round(mem.total_gib, 2), gpu_memory_gb=spec.memory_gib,
        fits=mem.total_gib <= spec.memory_gib, max_micro_batch=max_micro_batch(m, spec.memory_gib, cfg.optimizer),
        memory={k: round(v, 3) for k, v in asdict(mem).items()},
        optimizer=cfg.optimizer, optimizer_flops_per_step=float(optimizer_flops),
        optimizer_seconds_per_step=optimizer_seconds, optimizer_matrices_per_gpu=opt.step_matrices(m, gpus),
        interconnect_gbps=net.gbps, interconnect_source=net.source, interconnect_key=net.key,
        link_efficiency=comm.link_efficiency, link_efficiency_source=comm.efficiency_source,
        gradient_bytes=comm.gradient_bytes, compute_seconds=compute_seconds,
        intra_node_comm_seconds=comm.intra_node_seconds, comm_seconds=comm.inter_node_seconds,
        comm_overlap=comm.overlap, comm_exposed_seconds=comm.exposed_seconds,
        scaling_efficiency=compute_seconds / step_seconds,
    )
    b = phases.bill(est, cfg, local=local, spot=spot, idle_minutes=idle_minutes)
    est.breakdown_hours, est.all_in_hours, est.all_in_cost_usd = b.breakdown_hours, b.all_in_hours, b.all_in_cost_usd
    est.phase_sources, est.controller_usd = b.sources, b.controller_usd
    return est


def compare(recipe: Recipe, counts=(1, 8), price: float | None = None, prices=None, **kwargs) -> list[Estimate]:
    """Estimates over GPU types and the given counts, cheapest all-in first. prices(gpu, count), when
    given, returns catalog offers [Price]: one row per cloud that has the GPU; else every GPU type with a
    table price (or --price) gets one row."""
    rows = []
    for gpu in known_gpus():
        if gpu == "CPU":
            continue  # CPU ranks are for local runs, not something to rent for GPT-2
        for n in counts:
            if prices is not None:
                for offer in prices(gpu, n):
                    rows.append(estimate(recipe, gpu_type=gpu, gpus_per_node=n, check_batch=False, price=offer,
                                         **kwargs))
            elif price is not None or table_price(gpu) is not None:
                rows.append(estimate(recipe, gpu_type=gpu, gpus_per_node=n, check_batch=False, price=price, **kwargs))
    return sorted(rows, key=lambda e: (not e.fits, e.all_in_cost_usd))


def compare_nodes(recipe: Recipe, node_counts, **kwargs) -> list[Estimate]:
    """The same recipe, GPUs and price on each node count, fewest nodes first: where the network's share
    of each step (scaling_efficiency) makes another node stop paying."""
    counts = sorted(set(node_counts))
    if not counts:
        raise UserError("--compare-nodes: no node counts; use e.g. --compare-nodes 1,2,4,8")
    return [estimate(recipe, nodes=n, **kwargs) for n in counts]
