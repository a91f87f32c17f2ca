"""`gpt2cloud runs`: the local run registry ($GPT2CLOUD_HOME/runs/) as a table, with the dollars spent so far."""

from __future__ import annotations

import re
import time
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gpt2cloud.cli.output import print_json
from gpt2cloud.errors import UserError
from gpt2cloud.units import usd, when

SINCE_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([hdw])$")
SINCE_UNITS = {"h": 3600, "d": 86400, "w": 7 * 86400}


def runs_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON: an object with the records (runs) and the "
                                 "total (total)."),
    since: Optional[str] = typer.Option(None, "--since", metavar="DATE", help="Only runs launched since DATE: "
                                        "YYYY-MM-DD (local time), or a duration back from now (12h, 7d, 2w)."),
):
    """Every run launched from this machine: where it runs, what it trains, its price, estimate and dollars so
    far (summed in a total row)."""
    from gpt2cloud import home
    from gpt2cloud.runs import registry

    home.check_usable(write=False)  # read only: a home that is a file is named, not read as "no runs"
    after = parse_since(since, time.time()) if since is not None else None
    records = [r for r in registry.all_runs() if after is None or r.started_at >= after]
    now = _launching_now(records)
    spend = spend_by_run(records)
    total = spend_total(records, spend, after)
    if as_json:
        # one flat object per run: the spec's fields, then what happened to it here, then its dollars so far
        print_json({"runs": [{**r.spec.to_dict(), **{k: v for k, v in r.to_dict().items() if k != "spec"},
                              **({"state_now": now[r.run_id]} if r.run_id in now else {}),
                              "cost_so_far_usd": spend[r.run_id][0], "cost_source": spend[r.run_id][1]}
                             for r in records], "total": total})
        return
    console = Console(width=max(Console().width, 120))
    if not records:
        where = f" launched since {when(after)}" if after is not None else ""
        console.print(f"no runs{where} in {home.runs_dir()}; start one with `gpt2cloud launch`")
        return
    console.print(runs_table(records, now, spend, total, home.runs_dir()))
    console.print(spend_note(total), style="dim")
    console.print("live state and progress: `gpt2cloud status`", style="dim")


def parse_since(text: str, now: float) -> float:
    """--since: YYYY-MM-DD (midnight, local time) or a duration back from `now` (12h, 7d, 2w), as unix time."""
    m = SINCE_DURATION.match(text.strip().lower())
    if m:
        return now - float(m.group(1)) * SINCE_UNITS[m.group(2)]
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%d"))
    except (ValueError, OverflowError):
        raise UserError(f"--since {text!r}: give a date (YYYY-MM-DD, e.g. --since 2025-06-01) or a duration back "
                        "from now (12h, 7d, 2w)") from None


def spend_by_run(records) -> dict:
    """{run: (dollars so far or None, where the figure comes from)}: what this machine holds, no network call
    (gpt2cloud/runs/status.py known_spend)."""
    from gpt2cloud.runs.status import known_spend as of_run

    return {r.run_id: of_run(r) for r in records}


def spend_total(records, spend: dict, after: Optional[float]) -> dict:
    """The total row: dollars so far summed over the runs that have a figure here, the estimates summed,
    and the runs whose figure is only in their bucket (left out of the sum)."""
    known = [spend[r.run_id][0] for r in records if spend[r.run_id][0] is not None]
    estimates = [r.spec.estimate.cost_usd for r in records if r.spec.estimate is not None]
    return {"runs": len(records), "cost_so_far_usd": round(sum(known), 4),
            "cost_estimated_usd": round(sum(estimates), 4) if estimates else None,
            "without_figure": [r.run_id for r in records if spend[r.run_id][0] is None],
            "since": after}


def runs_table(records, now: dict, spend: dict, total: dict, runs_dir) -> Table:
    from gpt2cloud.runs.status import BUCKET_ON_DISK

    since = f", launched since {when(total['since'])}" if total["since"] is not None else ""
    t = Table(title=f"runs ({runs_dir}{since})")
    for col in ("run", "where", "GPUs", "recipe", "started", "$/GPU-h", "est. $", "so far", "cap", "last action",
                "bucket"):
        t.add_column(col, no_wrap=col in ("run", "started"))
    for r in records:
        s = r.spec
        where = f"{s.kind} / {s.infra}" + (" spot" if s.spot else "")
        so_far, source = spend[r.run_id]
        # a figure from a copy of the metrics here is as old as the copy: marked, and explained below the table
        so_far_cell = "?" if so_far is None else usd(so_far) + ("" if source == BUCKET_ON_DISK else "*")
        t.add_row(s.run_id, where, f"{s.nodes}x{s.gpu_type}:{s.gpus_per_node}", s.recipe, when(r.started_at),
                  f"{s.price_per_gpu_hour:.2f}", usd(s.estimate.cost_usd if s.estimate else None), so_far_cell,
                  usd(s.max_cost_usd) if s.max_cost_usd else "-",
                  (r.history[-1]["event"] if r.history else r.state) +
                  (f" (now {now[r.run_id]})" if r.run_id in now else ""), s.run_url)
    t.add_section()
    so_far = usd(total["cost_so_far_usd"]) + ("+?" if total["without_figure"] else "")  # +?: runs not summed
    t.add_row("total", f"{total['runs']} run{'s' if total['runs'] != 1 else ''}", "", "", "", "",
              usd(total["cost_estimated_usd"]), so_far, style="bold")
    return t


def spend_note(total: dict) -> str:
    """Where the "so far" figures come from, and which runs the total leaves out."""
    note = ("so far: each run's metrics on this disk (a file:// bucket; * a copy: what `gpt2cloud fetch` "
            "brought or a local run's node, as of that copy)")
    missing = total["without_figure"]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        note += f"; not in the total (their dollars are only in their bucket: `gpt2cloud status RUN`): {shown}"
    return note


def _launching_now(records) -> dict:
    """{run: its backend's state now} for the runs whose record still says LAUNCHING: a launch under way,
    or one that was killed (-9) and may have left a request or a cluster; the backend asks about every
    request and job the run had. Only those: the others' rows are the registry's, read without a network."""
    from gpt2cloud.backends import state_of
    from gpt2cloud.names import LAUNCHING

    return {r.run_id: state_of(r) for r in records if r.state == LAUNCHING}
