"""`gpt2cloud runs`: the local run registry ($GPT2CLOUD_HOME/runs/) as a table."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table

from gpt2cloud.cli.output import print_json
from gpt2cloud.units import usd


def runs_command(as_json: bool = typer.Option(False, "--json", help="Print the records as a JSON list.")):
    """Every run launched from this machine: where it runs, what it trains, its price and estimate."""
    from gpt2cloud import home
    from gpt2cloud.runs import registry

    home.check_usable(write=False)  # read only: a home that is a file is named, not read as "no runs"
    records = registry.all_runs()
    now = _launching_now(records)
    if as_json:
        # one flat object per run: the spec's fields, then what happened to it here
        print_json([{**r.spec.to_dict(), **{k: v for k, v in r.to_dict().items() if k != "spec"},
                     **({"state_now": now[r.run_id]} if r.run_id in now else {})} for r in records])
        return
    console = Console(width=max(Console().width, 120))
    if not records:
        console.print(f"no runs in {home.runs_dir()}; start one with `gpt2cloud launch`")
        return
    t = Table(title=f"runs ({home.runs_dir()})")
    for col in ("run", "where", "GPUs", "recipe", "started", "$/GPU-h", "est. $", "cap", "last action", "bucket"):
        t.add_column(col, no_wrap=col in ("run", "started"))
    for r in records:
        s = r.spec
        where = f"{s.kind} / {s.infra}" + (" spot" if s.spot else "")
        t.add_row(s.run_id, where, f"{s.nodes}x{s.gpu_type}:{s.gpus_per_node}", s.recipe,
                  time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at)), f"{s.price_per_gpu_hour:.2f}",
                  usd(s.estimate.cost_usd if s.estimate else None), usd(s.max_cost_usd) if s.max_cost_usd else "-",
                  (r.history[-1]["event"] if r.history else r.state) +
                  (f" (now {now[r.run_id]})" if r.run_id in now else ""), s.run_url)
    console.print(t)
    console.print("live state and progress: `gpt2cloud status`", style="dim")


def _launching_now(records) -> dict:
    """{run: its backend's state now} for the runs whose record still says LAUNCHING: a launch under way,
    or one that was killed (-9) and may have left a request or a cluster; the backend asks about every
    request and job the run had. Only those: the others' rows are the registry's, read without a network."""
    from gpt2cloud.backends import state_of
    from gpt2cloud.names import LAUNCHING

    return {r.run_id: state_of(r) for r in records if r.state == LAUNCHING}
