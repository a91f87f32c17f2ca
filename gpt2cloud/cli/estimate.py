"""`gpt2cloud estimate`: what a recipe costs on given GPUs, and whether it fits in their memory."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gpt2cloud.cli import completion
from gpt2cloud.cli.output import key_values, print_json
from gpt2cloud.errors import UserError
from gpt2cloud.names import LOCAL
from gpt2cloud.units import hours, human


def render(e, console: Console) -> None:
    verdict = "[green]fits[/]" if e.fits else "[red]does NOT fit[/]"
    rows = [
        ("recipe", e.recipe),
        ("hardware", f"{e.nodes} x {e.gpus_per_node} x {e.gpu_type} = {e.gpus} "
                     + ("CPU ranks (measured fp32 peak" if e.gpu_type == "CPU" else "GPUs (dense bf16 peak")
                     + f" {e.peak_tflops_per_gpu:g} TFLOPS each)"),
        ("parameters", f"{e.params:,}"),
        ("FLOPs per token", f"{e.flops_per_token:.3e}  ({e.flops_formula})"),
        ("tokens", f"{e.tokens:,} = {e.steps:,} steps x {e.tokens_per_step:,}"),
        ("batch", f"micro-batch {e.micro_batch} x gradient accumulation {e.grad_accum}"
                  + (f"  [yellow]({e.micro_batch_note})[/]" if e.micro_batch_note else "")),
        ("total FLOPs", f"{e.total_flops:.3e}"),
        ("efficiency", f"MFU {e.mfu:.1%}  [dim]({e.mfu_source})[/]"),
        ("throughput", f"{e.tokens_per_second:,.0f} tokens/s, {e.step_seconds:.3f} s/step"),
        *network_rows(e),
        ("wall time", hours(e.wall_hours)),
        ("GPU-hours", f"{e.gpu_hours:,.1f}"),
        ("price", f"${e.price_per_gpu_hour:.2f}/GPU-hour  [dim]({e.price_source})[/]"),
        ("cost", f"${e.cost_usd:,.0f} for the training loop"),
        ("all-in", f"[bold]${e.all_in_cost_usd:,.0f}[/] for {hours(e.all_in_hours)} of node time"
                   + (" (and the spot controller)" if e.controller_usd else "")),
        ("memory per GPU", f"{e.memory_gb_per_gpu:.1f} of {e.gpu_memory_gb:g} GiB: {verdict}; "
                           f"largest micro-batch that fits: {e.max_micro_batch}"),
    ]
    key_values(rows + fast_rows(e), console)
    render_phases(e, console)


def network_rows(e) -> list[tuple[str, str]]:
    """The gradient all-reduce: inside one node a note (the calibrated MFU pays for it), across nodes the
    interconnect, what each step spends on it and the scaling that leaves."""
    if e.nodes <= 1:
        if e.gpus_per_node <= 1 or e.gpu_type == "CPU" or not e.gradient_bytes:
            return []
        return [("network", f"one node: its all-reduce (~{e.intra_node_comm_seconds * 1e3:.0f} ms/step over "
                            "NVLink) is in the calibrated MFU; with --nodes the network between nodes adds to the step")]
    return [
        ("interconnect", f"{e.interconnect_gbps:,.0f} Gb/s between nodes at {e.link_efficiency:.0%} of line rate  "
                         f"[dim]({e.interconnect_source}; {e.link_efficiency_source})[/]"),
        ("all-reduce", f"{e.gradient_bytes / 1e9:.2f} GB of fp32 gradients per step: {e.comm_seconds * 1e3:,.0f} ms "
                       f"between nodes, {e.comm_overlap:.0%} hidden behind the backward, "
                       f"{e.comm_exposed_seconds * 1e3:,.0f} ms added to {e.compute_seconds * 1e3:,.0f} ms of compute"),
        ("scaling", f"{e.scaling_efficiency:.0%} efficiency: {e.nodes} nodes give "
                    f"{e.nodes * e.scaling_efficiency:.2f}x one node's tokens/s"),
    ]


def side_by_side(faithful: dict, fast: dict) -> str:
    """gpt2-1558m (faithful): 25.6 h, $613 -> gpt2-1558m-fast: 16.1 h, $386 all-in (-$227, -37%)"""
    saved = faithful["all_in_cost_usd"] - fast["all_in_cost_usd"]
    return (f"{faithful['recipe']} (faithful): {hours(faithful['all_in_hours'])}, ${faithful['all_in_cost_usd']:,.0f}"
            f" -> {fast['recipe']}: {hours(fast['all_in_hours'])}, ${fast['all_in_cost_usd']:,.0f} all-in "
            f"({'-' if saved >= 0 else '+'}${abs(saved):,.0f}, {-saved / faithful['all_in_cost_usd']:+.0%})")


def ratio_range(d) -> str:
    """'0.75x-0.9x the tokens ($392-$471 all-in)': the token ratios the evidence supports, with the fast run's
    all-in dollars at each end (one figure when the recipe gives no range)."""
    low, high = d["token_ratio_range"]
    costs = d.get("range_all_in_cost_usd") or []
    if low == high:
        return f"{low:g}x the tokens"
    dollars = f" (${costs[0]:,.0f}-${costs[1]:,.0f} all-in)" if len(costs) == 2 else ""
    return f"{low:g}x-{high:g}x the tokens{dollars}"


def measured(d) -> str:
    if d.get("measured_token_ratio") is not None:
        return f"{d['measured_token_ratio']:g}x ({d['measured_source']})"
    return ("[dim]none at this size yet: a GPU run's val loss curve against the faithful run's sets "
            "measured_token_ratio[/]")


def fast_rows(e) -> list[tuple[str, str]]:
    """For a fast recipe: its optimizer and what it adds to each step, the faithful recipe side by side, the
    saving as the range the evidence supports and what it rests on. For a faithful recipe with a fast one: that
    one side by side, with its range."""
    rows = []
    if e.optimizer == "muon":
        split = f"split over the {e.gpus} GPUs" if e.gpus > 1 else "on the one GPU"
        flops_ms = e.optimizer_flops_per_step / e.gpus / (e.mfu * e.peak_tflops_per_gpu * 1e12) * 1e3
        rows.append(("optimizer", f"Muon on the hidden matrices, AdamW on embeddings, biases, LayerNorms; "
                                  f"Newton-Schulz {split}: {e.optimizer_seconds_per_step * 1e3:,.1f} ms per step "
                                  f"({e.optimizer_matrices_per_gpu} matrices a GPU: {flops_ms:,.1f} ms of FLOPs at the "
                                  f"MFU + {e.optimizer_seconds_per_step * 1e3 - flops_ms:,.1f} ms per-matrix overhead), "
                                  f"{e.optimizer_seconds_per_step / e.step_seconds:.1%} of the step (counted)"))
    if e.faithful:
        mine = {"recipe": e.recipe, "all_in_hours": e.all_in_hours, "all_in_cost_usd": e.all_in_cost_usd}
        rows.append(("vs faithful", f"[bold]{side_by_side(e.faithful, mine)}[/]"))
        rows.append(("token saving", f"trains {e.token_ratio:g}x {e.faithful['recipe']}'s tokens ({e.tokens:,} of "
                                     f"{e.faithful['tokens']:,}); the same GPT-2, tokenizer and batch"))
        if e.token_ratio_range:
            rows.append(("evidence", f"[bold]{ratio_range(e.to_dict())}[/] with Muon"))
        rows.append(("rests on", e.basis))
        rows.append(("measured here", measured(e.to_dict())))
        rows.append(("CPU benchmark", f"Muon reached AdamW's final val loss in {e.bench_optim_step_ratio:g}x the "
                                      "steps of a 100-step run, a ratio that rises as runs grow "
                                      "(benchmarks/bench_optim.py: a small GPT-2 on Shakespeare at CPU scale; "
                                      "docs/training.md#the-cpu-benchmark); for reference, the steps follow the "
                                      "evidence above"
                     if e.bench_optim_step_ratio is not None else "[dim]no bench_optim_step_ratio in this recipe[/]"))
    if e.fast:
        mine = {"recipe": e.recipe, "all_in_hours": e.all_in_hours, "all_in_cost_usd": e.all_in_cost_usd}
        rng = ratio_range(e.fast) if e.fast.get("token_ratio_range") else f"{e.fast['token_ratio']:g}x the tokens"
        rows.append(("fast recipe", f"{side_by_side(mine, e.fast)}: trains {e.fast['token_ratio']:g}x the tokens with "
                                    f"Muon; the evidence: {rng} [dim](rests on: {e.fast['basis']})[/]"))
    return rows


# SkyPilot's jobs controller outlives a spot run: it stops after 10 idle minutes and is kept, so its 50 GB
# disk bills on (sky/jobs/constants.py CONTROLLER_AUTOSTOP: down False; CONTROLLER_RESOURCES: disk_size 50)
CONTROLLER_REMOVAL = ("SkyPilot stops it after 10 idle minutes and keeps it (its 50 GB disk bills on); remove it with "
                      "`gpt2cloud down --controller` once no managed job runs")


def render_phases(e, console: Console) -> None:
    """The all-in bill, phase by phase, each with where its figure comes from."""
    t = Table(title="the whole bill, phase by phase", title_justify="left", box=None, pad_edge=False)
    for col in ("phase", "time", "cost", "from"):
        t.add_column(col, justify="right" if col in ("time", "cost") else "left", overflow="fold")
    per_hour = e.gpus * e.price_per_gpu_hour
    for phase, h in e.breakdown_hours.items():
        if h > 0:
            t.add_row(phase, hours(h), f"${h * per_hour:,.2f}", e.phase_sources.get(phase, ""), style=None if
                      phase == "training" else "dim")
    if e.controller_usd:
        t.add_row("controller", hours(e.all_in_hours), f"${e.controller_usd:,.2f}", e.phase_sources["controller"],
                  style="dim")
    console.print(t)
    if e.controller_usd:
        console.print(f"the spot run's jobs controller: {CONTROLLER_REMOVAL}", soft_wrap=True)


def _where(e) -> str:
    """The cloud and instance a catalog price came from, else the table's."""
    prefix = "SkyPilot catalog: "
    return e.price_source[len(prefix):].split(",")[0] if e.price_source.startswith(prefix) else "table price"


def render_compare(rows: list, console: Console) -> None:
    """One row per GPU type and count; a fast recipe (or a faithful one with a fast sibling) gets a last
    column with the other recipe's all-in dollars on the same GPUs and price."""
    first = rows[0]
    other = "faithful" if first.faithful else "fast" if first.fast else None
    title = f"{first.recipe}: GPU types and counts, cheapest all-in first"
    caption = None
    if other:
        sib = getattr(first, other)
        title += f"; last column: {sib['recipe']} ({other}) on the same GPUs and price"
        fast = first.to_dict() if first.faithful else sib
        rng = ratio_range(fast) if fast.get("token_ratio_range") else f"{fast['token_ratio']:g}x the tokens"
        caption = (f"the fast recipe trains {fast['token_ratio']:g}x the tokens with Muon; the evidence: {rng}"
                   f"{' on the first row' if '$' in rng else ''}; rests on: {fast['basis']}")
    t = Table(title=title, caption=caption)
    cols = ["GPUs", "where", "MFU", "tok/s", "train", "all-in", "$/GPU-h", "train $", "all-in $", "mem/GPU", "fits"]
    if other:
        cols.append(f"{other} all-in $")
    for col in cols:
        t.add_column(col, justify="left" if col in ("GPUs", "where", "fits") else "right", no_wrap=col != "where")
    for e in rows:
        cells = [
            f"{e.gpu_type}:{e.gpus_per_node}", _where(e), f"{e.mfu:.0%}", human(e.tokens_per_second),
            hours(e.wall_hours), hours(e.all_in_hours), f"{e.price_per_gpu_hour:.2f}", f"${e.cost_usd:,.0f}",
            f"${e.all_in_cost_usd:,.0f}", f"{e.memory_gb_per_gpu:.0f}/{e.gpu_memory_gb:g}G",
            ("yes" + (f" (mb {e.micro_batch} x {e.grad_accum})" if e.micro_batch_note else "")) if e.fits else
            f"no (mb<={e.max_micro_batch})",
        ]
        if other:
            sib = getattr(e, other)
            cells.append(f"${sib['all_in_cost_usd']:,.0f}" + ("" if sib["fits"] else " (no fit)"))
        t.add_row(*cells, style=None if e.fits else "dim")
    console.print(t)


def render_compare_nodes(rows: list, console: Console) -> None:
    """One row per node count: throughput, the network's share of each step, time and dollars, and what each
    all-in wall-clock hour saved by the added nodes costs (where that climbs, another node stops paying)."""
    first = rows[0]
    t = Table(title=f"{first.recipe} on {first.gpu_type}:{first.gpus_per_node} per node: node counts, "
                    f"{first.interconnect_gbps:,.0f} Gb/s between nodes",
              caption=f"interconnect: {first.interconnect_source}; {first.link_efficiency:.0%} of line rate "
                      f"({first.link_efficiency_source}). All-reduce of {first.gradient_bytes / 1e9:.2f} GB of fp32 "
                      "gradients once per step, 2(N-1)/N of it through each node's network; the backward hides "
                      "what it can; scaling = one node's step compute over the step", title_justify="left",
              caption_justify="left")
    cols = ["nodes", "GPUs", "batch", "tok/s", "s/step", "comm added", "scaling", "train", "all-in", "train $",
            "all-in $", "$ per all-in hour saved"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("nodes", "batch") else "right", no_wrap=True)
    prev = None
    for e in rows:
        t.add_row(str(e.nodes), str(e.gpus), f"{e.micro_batch} x {e.grad_accum}", human(e.tokens_per_second),
                  f"{e.step_seconds:.3f}", f"{e.comm_exposed_seconds * 1e3:,.0f} ms", f"{e.scaling_efficiency:.0%}",
                  hours(e.wall_hours), hours(e.all_in_hours), f"${e.cost_usd:,.0f}", f"${e.all_in_cost_usd:,.0f}",
                  hour_saved(prev, e), style=None if e.fits else "dim")
        prev = e
    console.print(t)


def hour_saved(before, after) -> str:
    """The extra all-in dollars per hour of all-in wall-clock time (the all-in column: launch to the end)
    the added nodes save, against the row before ('-' for the first row)."""
    if before is None:
        return "-"
    saved = before.all_in_hours - after.all_in_hours
    extra = after.all_in_cost_usd - before.all_in_cost_usd
    if saved <= 0:
        return "saves no time"
    return "cheaper too" if extra <= 0 else f"${extra / saved:,.0f}"


def parse_node_counts(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8]: whole node counts, 1 to 1024."""
    try:
        counts = [int(p) for p in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(not 1 <= n <= 1024 for n in counts):
        raise UserError(f"--compare-nodes '{text}': expected node counts from 1 to 1024, e.g. --compare-nodes 1,2,4,8")
    return counts


def catalog_prices(clouds: list[str], spot: bool):
    """price(gpu, count) -> [Price] from SkyPilot's catalogs of these clouds (one offer per cloud)."""
    from gpt2cloud.launch.clouds import catalog_price

    def lookup(gpu: str, count: int) -> list:
        return [found for c in clouds if (found := catalog_price(c, gpu, count, spot))]

    return lookup


def estimate_command(
    recipe: str = typer.Argument(..., help="Recipe name (gpt2-124m, ...) or path to a recipe YAML.",
                                 autocompletion=completion.recipes),
    gpus: str = typer.Option("H100:8", "--gpus", help="GPU type and count per node, as SkyPilot spells it."),
    nodes: int = typer.Option(1, "--nodes", help="Number of nodes."),
    price: Optional[float] = typer.Option(None, "--price", help="USD per GPU-hour (default: bundled table)."),
    mfu: Optional[float] = typer.Option(None, "--mfu", help="Model FLOPs utilisation in (0, 1] (default: calibration)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the recipe's steps."),
    tokens_per_step: Optional[int] = typer.Option(None, "--tokens-per-step", help="Override tokens per step."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Override the micro-batch per GPU."),
    infra: Optional[str] = typer.Option(None, "--infra", help="Price from SkyPilot's catalog of this cloud "
                                        "(optionally /region); with --compare a comma list, e.g. lambda,aws."),
    spot: bool = typer.Option(False, "--spot", help="Spot prices, and the recoveries and controller of a spot run."),
    idle_minutes: float = typer.Option(10, "--idle-minutes", help="Idle minutes before autostop (in the all-in bill)."),
    interconnect_gbps: Optional[float] = typer.Option(
        None, "--interconnect-gbps", help="Network between nodes in Gb/s per node, its NICs together (default: the "
        "bundled table's for the cloud and instance priced, else a conservative 100)."),
    compare_: bool = typer.Option(False, "--compare", help="Compare GPU types and counts, sorted by all-in cost."),
    compare_nodes_: Optional[str] = typer.Option(
        None, "--compare-nodes", help="Compare node counts of --gpus, e.g. 1,2,4,8: tokens/s, time, dollars and the "
        "scaling efficiency the network leaves."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (a list with --compare)."),
):
    """Tokens, FLOPs, wall time, GPU-hours, dollars and per-GPU memory for a recipe."""
    # imported here so `gpt2cloud --help` does not pay for pydantic
    from gpt2cloud.cost.estimate import compare, compare_nodes, estimate
    from gpt2cloud.cost.hardware import parse_gpus
    from gpt2cloud.cost.recipes import load_recipe

    from gpt2cloud.errors import positive

    r = load_recipe(recipe)
    gpu_type, count = parse_gpus(gpus)
    positive("--idle-minutes", idle_minutes, "10")
    positive("--interconnect-gbps", interconnect_gbps, "3200")
    if compare_ and compare_nodes_ is not None:
        raise UserError("--compare and --compare-nodes: pick one (GPU types, or node counts of one --gpus)")
    node_counts = parse_node_counts(compare_nodes_) if compare_nodes_ is not None else None
    local = (infra or "").lower() == LOCAL
    common = dict(mfu=mfu, steps=steps, tokens_per_step=tokens_per_step, micro_batch=micro_batch, spot=spot,
                  idle_minutes=idle_minutes, local=local, interconnect_gbps=interconnect_gbps)
    console = Console()
    if compare_:
        clouds = [c.strip().lower() for c in (infra or "").split(",") if c.strip()] if not local else []
        rows = compare(r, price=price, prices=catalog_prices(clouds, spot) if clouds and price is None else None,
                       **common)
        console = Console(width=max(console.width, 145))  # the table needs ~130 columns, ~145 side by side
        if as_json:
            print_json([e.to_dict() for e in rows])
        else:
            render_compare(rows, console)
        return
    if price is None and infra and not local:  # SkyPilot's catalog (imports sky: only when asked for)
        from gpt2cloud.launch.clouds import catalog_price, check_infra

        check_infra(infra.lower(), gpu_type, count, spot)
        price = catalog_price(infra.lower(), gpu_type, count, spot)
        if price is None:
            raise UserError(f"--infra {infra}: no {'spot ' if spot else ''}price for {gpu_type}:{count} in SkyPilot's "
                            "catalog (offline with no cached catalog?); pass --price USD_PER_GPU_HOUR")
    if node_counts is not None:
        rows = compare_nodes(r, node_counts, gpu_type=gpu_type, gpus_per_node=count, price=price, **common)
        if as_json:
            print_json([e.to_dict() for e in rows])
        else:
            render_compare_nodes(rows, Console(width=max(console.width, 130)))
        return
    e = estimate(r, gpu_type=gpu_type, gpus_per_node=count, nodes=nodes, price=price, **common)
    if as_json:
        print_json(e.to_dict())
    else:
        render(e, console)
