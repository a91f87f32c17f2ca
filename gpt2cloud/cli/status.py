"""`gpt2cloud status [RUN]`: SkyPilot's state plus progress from the bucket's metrics.jsonl."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gpt2cloud.cli.output import key_values, print_json
from gpt2cloud.units import hours, usd


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render_one(d: dict, console: Console) -> None:
    pct = f" ({d['step'] / d['total_steps']:.0%})" if d["step"] is not None and d["total_steps"] else ""
    done = (" [green]finished[/]" if d["finished"] else " [yellow]stopped at the budget cap[/]" if d["budget_stopped"]
            else " [yellow]stopped at the time limit (--max-hours)[/]" if d.get("time_stopped") else "")
    cap = f" of a {usd(d['max_cost_usd'])} cap" if d["max_cost_usd"] else " (no budget cap)"
    rows = [
        ("run", f"{d['run']}  [dim]{d['kind']} on {d['infra']}, {d['gpus']}, {d['recipe']}[/]"),
        ("state", f"{d['state']}{done}" + (f"  [dim]node: {d['phase']}[/]" if d.get("phase") and not done else "")),
        ("step", f"{_num(d['step'], 'd')} / {d['total_steps']}{pct}"),
        ("loss", f"{_num(d['loss'], '.4f')}   val {_num(d['val_loss'], '.4f')}"),
        ("speed", f"{_num(d['tokens_per_second'], ',.0f')} tokens/s, {_num(d['step_seconds'], '.3f')} s/step, "
                  f"MFU {'-' if d['mfu'] is None else format(d['mfu'], '.1%')}"),
        ("time", f"{hours(d['elapsed_hours'])} so far, ETA {hours(d['eta_hours'])}"),
        ("cost", f"{usd(d['cost_so_far_usd'])} so far (node time {hours(d.get('node_hours'))}), ~{usd(d['cost_projected_usd'])} projected{cap}  "
                 f"[dim](${d['price_per_gpu_hour']:.2f}/GPU-hour; estimate {usd(d['cost_estimated_usd'])})[/]"),
        ("bucket", d["run_url"]),
    ]
    if d.get("restarts"):
        rows.append(("restarts", f"{d['restarts']} (resumed from the bucket's newest checkpoint)"))
    if d.get("sample"):
        rows.append(("sample", repr(d["sample"])[:200]))
    if d.get("note"):
        rows.append(("note", d["note"]))
    key_values(rows, console)


def render_many(rows: list[dict], console: Console) -> None:
    t = Table(title="gpt2cloud runs")
    for col in ("run", "state", "step", "loss", "tok/s", "ETA", "so far", "projected", "cap"):
        t.add_column(col, no_wrap=col in ("run", "step"))
    for d in rows:
        t.add_row(d["run"], d["state"], f"{_num(d['step'], 'd')}/{d['total_steps']}", _num(d["loss"], ".3f"),
                  _num(d["tokens_per_second"], ",.0f"), hours(d["eta_hours"]), usd(d["cost_so_far_usd"]),
                  usd(d["cost_projected_usd"]), usd(d["max_cost_usd"]))
    console.print(t)


def status_command(
    run: Optional[str] = typer.Argument(None, help="Run id (default: every run in the registry)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object for RUN, else a list)."),
):
    """SkyPilot state and training progress (step, loss, speed, ETA, dollars) of a run or all runs."""
    from gpt2cloud import home
    from gpt2cloud.runs import registry
    from gpt2cloud.runs.status import run_status

    home.check_usable(write=False)  # read only: a home that is a file is named, not read as "no runs"
    if run:
        d = run_status(registry.get(run))
        print_json(d) if as_json else render_one(d, Console())
        return
    rows = [run_status(r) for r in registry.all_runs()]
    if as_json:
        print_json(rows)
    elif not rows:
        Console().print("no runs yet; start one with `gpt2cloud launch`")
    else:
        render_many(rows, Console(width=max(Console().width, 110)))
