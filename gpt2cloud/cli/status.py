"""`gpt2cloud status [RUN]`: SkyPilot's state plus progress from the bucket's metrics.jsonl; `--watch` redraws
one run's every interval (gpt2cloud/runs/watch.py) until it ends."""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gpt2cloud.cli import completion
from gpt2cloud.cli.output import key_values, print_json
from gpt2cloud.errors import UserError
from gpt2cloud.runs import watch
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
    unseen = d.get("unseen_attempts") or {}
    if unseen.get("attempts"):  # in the cost above; a spot run's attempts that left nothing in the bucket
        n = unseen["attempts"]
        rows.insert(-1, ("", f"{n} attempt{'s' if n != 1 else ''} preempted before their first push: "
                             f"+{usd(unseen['usd'])}, from {unseen['source']}"))
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
    run: Optional[str] = typer.Argument(None, help="Run id (default: every run in the registry).",
                                        autocompletion=completion.runs),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (an object for RUN, else a list; with --watch, "
                                 "one object a line per refresh)."),
    watch_run: bool = typer.Option(False, "--watch", help="Redraw RUN's status every --interval seconds until the "
                                   "run ends, then print its final status; Ctrl-C stops watching (the run goes on). "
                                   "Piped: one line per refresh."),
    interval: Optional[float] = typer.Option(None, "--interval", metavar="SECONDS", help=(
        f"Seconds between --watch's refreshes (default {watch.DEFAULT_INTERVAL_S:g}, at least "
        f"{watch.MIN_INTERVAL_S:g}).")),
):
    """SkyPilot state and training progress (step, loss, speed, ETA, dollars) of a run or all runs; --watch
    follows one run live until it ends."""
    from gpt2cloud import home
    from gpt2cloud.runs import registry
    from gpt2cloud.runs.status import run_status

    home.check_usable(write=False)  # read only: a home that is a file is named, not read as "no runs"
    if interval is not None and not watch_run:
        raise UserError(f"--interval {interval:g} is for --watch: gpt2cloud status {run or 'RUN'} --watch "
                        f"--interval {interval:g}")
    if watch_run:
        if not run:
            raise UserError("--watch follows one run: gpt2cloud status RUN --watch (`gpt2cloud runs` lists them)")
        seconds = watch.check_interval(watch.DEFAULT_INTERVAL_S if interval is None else interval)
        registry.get(run)  # an unknown run is one line now, not an error redrawn every refresh
        try:
            watch_status(run, seconds, as_json, Console())
        except KeyboardInterrupt:
            pass  # Ctrl-C ends the watch, not the run: exit 0 (Live's exit has restored the terminal)
        return
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


# ---- --watch: the loop is gpt2cloud/runs/watch.py's; these draw its frames


def watch_status(run: str, interval: float, as_json: bool, console: Console, **loop) -> None:
    """Watch RUN until it ends: JSON lines (--json), a Live view on a terminal, else one line per refresh;
    then its final status once (not with --json: the last line is it). `loop`: watch.watch's clock, sleep, ..."""
    if as_json:
        watch.watch(run, interval, lambda f: _json_line(watch_json(f)), **loop)
        return
    if not console.is_terminal:
        final = watch.watch(run, interval, lambda f: console.print(watch_line(f), markup=False, highlight=False,
                                                                    soft_wrap=True), **loop)
        render_one(final.status, console)
        return
    from rich.live import Live
    from rich.text import Text

    with Live(console=console, auto_refresh=False) as live:
        # the ended frame clears the view: the final status below replaces it; Ctrl-C leaves the last one up
        final = watch.watch(run, interval, lambda f: live.update(Text("") if f.ended else watch_view(f, interval),
                                                                  refresh=True), **loop)
    render_one(final.status, console)


def _json_line(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()  # a reader of the pipe sees each refresh as it comes


def watch_json(frame: watch.Frame) -> dict:
    """One refresh as a JSON object: status's, plus node_phase, ended and refreshed_at; a failed refresh is
    {run, refreshed_at, refresh_error, ended: false} (no stale figures)."""
    if frame.error is not None or frame.status is None:
        return {"run": frame.run, "refreshed_at": frame.at, "refresh_error": frame.error, "ended": False}
    return {**frame.status, "node_phase": frame.phase, "ended": frame.ended, "refreshed_at": frame.at}


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def _spend(d: dict) -> str:
    """Dollars so far against the launch's estimate."""
    est = d.get("cost_estimated_usd")
    share = f" ({d['cost_so_far_usd'] / est:.0%})" if est else ""
    so_far = usd(d["cost_so_far_usd"])
    return f"{so_far} of ~{usd(est)} estimated{share}" if est else f"{so_far} (no estimate)"


def watch_line(frame: watch.Frame) -> str:
    """One refresh as one plain line (piped output, a log file)."""
    head = f"{_clock(frame.at)}  {frame.run}"
    d = frame.status
    if d is None:
        return f"{head}  refresh failed: {frame.error}"
    body = (f"{d['state']}  {frame.phase}  step {_num(d['step'], 'd')}/{d['total_steps']}  "
            f"loss {_num(d['loss'], '.4f')}  {_num(d['tokens_per_second'], ',.0f')} tokens/s  {_spend(d)}  "
            f"ETA {hours(d['eta_hours'])}")
    failed = f"  refresh failed: {frame.error} (figures from the last good refresh)" if frame.error else ""
    return f"{head}  {body}{failed}"


def watch_view(frame: watch.Frame, interval: float):
    """One refresh as the Live view: the figures, the loss curve, the node's phase and when it was read."""
    from rich.markup import escape

    d = frame.status
    rows = [("run", escape(frame.run))]
    if d is not None:
        pct = d["step"] / d["total_steps"] if d["step"] is not None and d["total_steps"] else 0.0
        bar = "█" * round(pct * 20) + "░" * (20 - round(pct * 20))
        curve = watch.sparkline(frame.losses)
        doing = f"; node: {escape(str(d['phase']))}" if d.get("phase") not in (None, frame.phase) else ""
        pushes = "  [yellow]the node's pushes fail or are late (note)[/]" if d.get("push_warning") else ""
        rows += [
            ("phase", f"[bold]{escape(frame.phase)}[/]  [dim]{escape(d['state'])}{doing}[/]{pushes}"),
            ("step", f"{_num(d['step'], 'd')} / {d['total_steps']}  {bar} {pct:.0%}"),
            ("loss", f"{_num(d['loss'], '.4f')}  val {_num(d['val_loss'], '.4f')}"
                     + (f"  [cyan]{curve}[/] [dim]({len(frame.losses)} steps)[/]" if curve else "")),
            ("speed", f"{_num(d['tokens_per_second'], ',.0f')} tokens/s"),
            ("cost", f"{_spend(d)}; ~{usd(d['cost_projected_usd'])} projected"
                     + (f", cap {usd(d['max_cost_usd'])}" if d.get("max_cost_usd") else "")),
            ("ETA", f"{hours(d['eta_hours'])}  [dim]({hours(d['elapsed_hours'])} so far)[/]"),
        ]
        if d.get("note"):
            rows.append(("note", escape(d["note"])))
    if frame.error:
        stale = " [dim](figures from the last good refresh)[/]" if d is not None else ""
        rows.append(("refresh", f"[red]failed: {escape(frame.error)}[/]{stale}"))
    rows.append(("", f"[dim]read {_clock(frame.at)}, every {interval:g} s; Ctrl-C stops watching "
                     "(the run goes on)[/]"))
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t
