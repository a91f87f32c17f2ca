"""`gpt2cloud estimate`: what a recipe costs on given GPUs, and whether it fits in their memory."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gpt2cloud.cli.output import key_values, print_json
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
        ("batch", f"micro-batch {e.micro_batch} x gradient accumulation {e.grad_accum}"),
        ("total FLOPs", f"{e.total_flops:.3e}"),
        ("efficiency", f"MFU {e.mfu:.1%}  [dim]({e.mfu_source})[/]"),
        ("throughput", f"{e.tokens_per_second:,.0f} tokens/s, {e.step_seconds:.3f} s/step"),
        ("wall time", hours(e.wall_hours)),
        ("GPU-hours", f"{e.gpu_hours:,.1f}"),
        ("price", f"${e.price_per_gpu_hour:.2f}/GPU-hour  [dim]({e.price_source})[/]"),
        ("cost", f"[bold]${e.cost_usd:,.0f}[/]"),
        ("memory per GPU", f"{e.memory_gb_per_gpu:.1f} of {e.gpu_memory_gb:g} GiB: {verdict}; "
                           f"largest micro-batch that fits: {e.max_micro_batch}"),
    ]
    key_values(rows, console)


def render_compare(rows: list, console: Console) -> None:
    t = Table(title=f"{rows[0].recipe}: GPU types and counts, cheapest first")
    for col in ("GPUs", "MFU", "tok/s", "wall", "GPU-h", "$/GPU-h", "cost", "mem/GPU", "fits"):
        t.add_column(col, justify="left" if col in ("GPUs", "fits") else "right", no_wrap=True)
    for e in rows:
        t.add_row(
            f"{e.gpu_type}:{e.gpus_per_node}", f"{e.mfu:.0%}", human(e.tokens_per_second), hours(e.wall_hours),
            f"{e.gpu_hours:,.0f}", f"{e.price_per_gpu_hour:.2f}", f"${e.cost_usd:,.0f}",
            f"{e.memory_gb_per_gpu:.0f}/{e.gpu_memory_gb:g}G",
            "yes" if e.fits else f"no (mb<={e.max_micro_batch})", style=None if e.fits else "dim",
        )
    console.print(t)


def estimate_command(
    recipe: str = typer.Argument(..., help="Recipe name (gpt2-124m, ...) or path to a recipe YAML."),
    gpus: str = typer.Option("H100:8", "--gpus", help="GPU type and count per node, as SkyPilot spells it."),
    nodes: int = typer.Option(1, "--nodes", help="Number of nodes."),
    price: Optional[float] = typer.Option(None, "--price", help="USD per GPU-hour (default: bundled table)."),
    mfu: Optional[float] = typer.Option(None, "--mfu", help="Model FLOPs utilisation in (0, 1] (default: calibration)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the recipe's steps."),
    tokens_per_step: Optional[int] = typer.Option(None, "--tokens-per-step", help="Override tokens per step."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Override the micro-batch per GPU."),
    compare_: bool = typer.Option(False, "--compare", help="Compare GPU types and counts, sorted by cost."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (a list with --compare)."),
):
    """Tokens, FLOPs, wall time, GPU-hours, dollars and per-GPU memory for a recipe."""
    # imported here so `gpt2cloud --help` does not pay for pydantic
    from gpt2cloud.cost.estimate import compare, estimate
    from gpt2cloud.cost.hardware import parse_gpus
    from gpt2cloud.cost.recipes import load_recipe

    r = load_recipe(recipe)
    gpu_type, count = parse_gpus(gpus)
    common = dict(price=price, mfu=mfu, steps=steps, tokens_per_step=tokens_per_step, micro_batch=micro_batch)
    console = Console()
    if compare_:
        rows = compare(r, **common)
        console = Console(width=max(console.width, 100))  # the table needs ~100 columns
        if as_json:
            print_json([e.to_dict() for e in rows])
        else:
            render_compare(rows, console)
        return
    e = estimate(r, gpu_type=gpu_type, gpus_per_node=count, nodes=nodes, **common)
    if as_json:
        print_json(e.to_dict())
    else:
        render(e, console)
