"""`gpt2cloud status [RUN]`: SkyPilot's state plus progress from the bucket's metrics.jsonl."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from gpt2cloud.units import usd


def _hours(h: Optional[float]) -> str:
    if h is None:
        return "-"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _money(x) -> str:
    return "-" if x is None else usd(x)


def run_status(record) -> dict:
    """One run's status as a dict (the --json object)."""
    from gpt2cloud import progress, runs

    state = runs.state_of(record)
    records, problem = progress.read_run_metrics(record.run_url)
    pr = progress.summarize(records, record.total_steps, record.gpus, record.price_per_gpu_hour,
                            record.max_cost_usd)
    d = {
        "run": record.run_id, "state": state, "kind": record.kind, "infra": record.infra,
        "gpus": f"{record.nodes} x {record.gpu_type}:{record.gpus_per_node}", "recipe": record.recipe,
        "run_url": record.run_url, "started_at": record.started_at,
        "step": pr.step, "total_steps": pr.total_steps, "loss": pr.loss, "val_loss": pr.val_loss,
        "tokens_per_second": pr.tokens_per_second, "mfu": pr.mfu, "step_seconds": pr.step_seconds,
        "eta_hours": pr.eta_hours, "elapsed_hours": pr.elapsed_hours,
        "price_per_gpu_hour": record.price_per_gpu_hour, "cost_so_far_usd": pr.cost_so_far_usd,
        "cost_projected_usd": pr.cost_projected_usd, "cost_estimated_usd": record.estimate.get("cost_usd"),
        "max_cost_usd": record.max_cost_usd or None, "finished": pr.finished, "budget_stopped": pr.budget_stopped,
        "restarts": pr.restarts, "sample": pr.sample,
    }
    if problem:
        d["note"] = problem
    if pr.finished and record.kind != "local":
        # A finished GPU run teaches `gpt2cloud estimate` its measured MFU (gpt2cloud/calibration.py).
        try:
            from gpt2cloud.calibration import calibrate_from_metrics

            d["calibration"] = calibrate_from_metrics(record, records)[1]
        except Exception as e:  # noqa: BLE001 - status must not fail over the calibration side effect
            d["calibration"] = f"not recorded: {type(e).__name__}: {e}"
    return d


def render_one(d: dict, console: Console) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    pct = f" ({d['step'] / d['total_steps']:.0%})" if d["step"] is not None and d["total_steps"] else ""
    done = " [green]finished[/]" if d["finished"] else " [yellow]stopped at the budget cap[/]" if d["budget_stopped"] else ""
    cap = f" of a {usd(d['max_cost_usd'])} cap" if d["max_cost_usd"] else " (no budget cap)"
    rows = [
        ("run", f"{d['run']}  [dim]{d['kind']} on {d['infra']}, {d['gpus']}, {d['recipe']}[/]"),
        ("state", f"{d['state']}{done}"),
        ("step", f"{_num(d['step'], 'd')} / {d['total_steps']}{pct}"),
        ("loss", f"{_num(d['loss'], '.4f')}   val {_num(d['val_loss'], '.4f')}"),
        ("speed", f"{_num(d['tokens_per_second'], ',.0f')} tokens/s, {_num(d['step_seconds'], '.3f')} s/step, "
                  f"MFU {'-' if d['mfu'] is None else format(d['mfu'], '.1%')}"),
        ("time", f"{_hours(d['elapsed_hours'])} so far, ETA {_hours(d['eta_hours'])}"),
        ("cost", f"{usd(d['cost_so_far_usd'])} so far, ~{_money(d['cost_projected_usd'])} projected{cap}  "
                 f"[dim](${d['price_per_gpu_hour']:.2f}/GPU-hour; estimate {_money(d['cost_estimated_usd'])})[/]"),
        ("bucket", d["run_url"]),
    ]
    if d.get("restarts"):
        rows.append(("restarts", f"{d['restarts']} (resumed from the bucket's newest checkpoint)"))
    if d.get("sample"):
        rows.append(("sample", repr(d["sample"])[:200]))
    if d.get("note"):
        rows.append(("note", d["note"]))
    if d.get("calibration"):
        rows.append(("calibration", d["calibration"]))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def render_many(rows: list[dict], console: Console) -> None:
    t = Table(title="gpt2cloud runs")
    for col in ("run", "state", "step", "loss", "tok/s", "ETA", "so far", "projected", "cap"):
        t.add_column(col, no_wrap=col in ("run", "step"))
    for d in rows:
        t.add_row(d["run"], d["state"], f"{_num(d['step'], 'd')}/{d['total_steps']}", _num(d["loss"], ".3f"),
                  _num(d["tokens_per_second"], ",.0f"), _hours(d["eta_hours"]), usd(d["cost_so_far_usd"]),
                  _money(d["cost_projected_usd"]), _money(d["max_cost_usd"]))
    console.print(t)


def status_command(
    run: Optional[str] = typer.Argument(None, help="Run id (default: every run in the registry)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object for RUN, else a list)."),
):
    """SkyPilot state and training progress (step, loss, speed, ETA, dollars) of a run or all runs."""
    from gpt2cloud import registry
    from gpt2cloud.cli import print_json

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
