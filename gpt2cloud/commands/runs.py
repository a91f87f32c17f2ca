"""`gpt2cloud runs`: the local run registry ($GPT2CLOUD_HOME/runs/) as a table."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table


def runs_command(as_json: bool = typer.Option(False, "--json", help="Print the records as a JSON list.")):
    """Every run launched from this machine: where it runs, what it trains, its price and estimate."""
    from gpt2cloud import registry
    from gpt2cloud.cli import print_json
    from gpt2cloud.units import usd

    records = registry.all_runs()
    if as_json:
        print_json([r.to_dict() for r in records])
        return
    console = Console(width=max(Console().width, 120))
    if not records:
        console.print(f"no runs in {registry.runs_dir()}; start one with `gpt2cloud launch`")
        return
    t = Table(title=f"runs ({registry.runs_dir()})")
    for col in ("run", "where", "GPUs", "recipe", "started", "$/GPU-h", "est. $", "cap", "last action", "bucket"):
        t.add_column(col, no_wrap=col in ("run", "started"))
    for r in records:
        where = f"{r.kind} / {r.infra}" + (" spot" if r.spot else "")
        t.add_row(r.run_id, where, f"{r.nodes}x{r.gpu_type}:{r.gpus_per_node}", r.recipe,
                  time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at)), f"{r.price_per_gpu_hour:.2f}",
                  usd(r.estimate.get('cost_usd', 0)), usd(r.max_cost_usd) if r.max_cost_usd else "-",
                  r.history[-1]["event"] if r.history else r.state, r.run_url)
    console.print(t)
    console.print("live state and progress: `gpt2cloud status`", style="dim")
