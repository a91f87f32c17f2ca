"""`gpt2cloud estimate`: what a recipe costs on given GPUs, and whether it fits in their memory."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

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


def side_by_side(faithful: dict, fast: dict) -> str:
    """gpt2-1558m (faithful): 25.6 h, $613 -> gpt2-1558m-fast: 16.1 h, $386 all-in (-$227, -37%)"""
    saved = faithful["all_in_cost_usd"] - fast["all_in_cost_usd"]
    return (f"{faithful['recipe']} (faithful): {hours(faithful['all_in_hours'])}, ${faithful['all_in_cost_usd']:,.0f}"
            f" -> {fast['recipe']}: {hours(fast['all_in_hours'])}, ${fast['all_in_cost_usd']:,.0f} all-in "
            f"({'-' if saved >= 0 else '+'}${abs(saved):,.0f}, {-saved / faithful['all_in_cost_usd']:+.0%})")


def fast_rows(e) -> list[tuple[str, str]]:
    """For a fast recipe: its optimizer, the faithful recipe side by side, the measurement it rests on.
    For a faithful recipe with a fast one: that one side by side."""
    rows = []
    if e.optimizer == "muon":
        share = e.optimizer_flops_per_step / (e.flops_per_token * e.tokens_per_step)
        rows.append(("optimizer", f"Muon on the hidden matrices, AdamW on embeddings, biases, LayerNorms; "
                                  f"Newton-Schulz on every GPU adds {share:.1%} to each step's FLOPs (counted)"))
    if e.faithful:
        mine = {"recipe": e.recipe, "all_in_hours": e.all_in_hours, "all_in_cost_usd": e.all_in_cost_usd}
        rows.append(("vs faithful", f"[bold]{side_by_side(e.faithful, mine)}[/]"))
        rows.append(("token saving", f"{e.token_ratio:g}x {e.faithful['recipe']}'s ({e.tokens:,} of "
                               f"{e.faithful['tokens']:,}); the same GPT-2, tokenizer and batch"))
        rows.append(("rests on", e.basis))
        rows.append(("CPU benchmark", f"Muon reached AdamW's final val loss in {e.bench_optim_step_ratio:g}x the "
                                      "steps (benchmarks/bench_optim.py)" if e.bench_optim_step_ratio is not None
                     else "[dim]no bench_optim_step_ratio in this recipe[/]"))
    if e.fast:
        mine = {"recipe": e.recipe, "all_in_hours": e.all_in_hours, "all_in_cost_usd": e.all_in_cost_usd}
        rows.append(("fast recipe", f"{side_by_side(mine, e.fast)}: {e.fast['token_ratio']:g}x the tokens with Muon "
                                    f"[dim](rests on: {e.fast['basis']})[/]"))
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
        basis = first.basis or sib.get("basis")
        caption = f"{first.token_ratio or sib.get('token_ratio'):g}x the tokens with Muon; rests on: {basis}"
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


def catalog_prices(clouds: list[str], spot: bool):
    """price(gpu, count) -> [Price] from SkyPilot's catalogs of these clouds (one offer per cloud)."""
    from gpt2cloud.launch.clouds import catalog_price

    def lookup(gpu: str, count: int) -> list:
        return [found for c in clouds if (found := catalog_price(c, gpu, count, spot))]

    return lookup


def estimate_command(
    recipe: str = typer.Argument(..., help="Recipe name (gpt2-124m, ...) or path to a recipe YAML."),
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
    compare_: bool = typer.Option(False, "--compare", help="Compare GPU types and counts, sorted by all-in cost."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (a list with --compare)."),
):
    """Tokens, FLOPs, wall time, GPU-hours, dollars and per-GPU memory for a recipe."""
    # imported here so `gpt2cloud --help` does not pay for pydantic
    from gpt2cloud.cost.estimate import compare, estimate
    from gpt2cloud.cost.hardware import parse_gpus
    from gpt2cloud.cost.recipes import load_recipe

    from gpt2cloud.errors import positive

    r = load_recipe(recipe)
    gpu_type, count = parse_gpus(gpus)
    positive("--idle-minutes", idle_minutes, "10")
    local = (infra or "").lower() == LOCAL
    common = dict(mfu=mfu, steps=steps, tokens_per_step=tokens_per_step, micro_batch=micro_batch, spot=spot,
                  idle_minutes=idle_minutes, local=local)
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
    e = estimate(r, gpu_type=gpu_type, gpus_per_node=count, nodes=nodes, price=price, **common)
    if as_json:
        print_json(e.to_dict())
    else:
        render(e, console)
