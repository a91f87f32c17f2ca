"""`gpt2cloud plot`: one PNG that says at a glance how a run went.

Four panels: loss against tokens (train, smoothed train, val, and OpenAI's GPT-2 124M val loss),
HellaSwag against tokens (with GPT-2 124M and 1558M), tokens/s against step (with the estimate),
dollars against step (with the estimate). matplotlib is imported inside the function, with the Agg
backend, so the CLI stays fast and works without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from gpt2cloud.cost.estimate import Estimate
from gpt2cloud.runs.rundata import RunData
from gpt2cloud.units import duration, human, usd

# OpenAI's released checkpoints (shared notes, gpt2-reference.md).
GPT2_124M_VAL_LOSS = 3.2924  # FineWeb-Edu val shard
GPT2_124M_HELLASWAG = 0.2955  # acc_norm, completion style
GPT2_1558M_HELLASWAG = 0.4893
CHANCE_HELLASWAG = 0.25


def _smooth(values: list[float]) -> list[float]:
    """Centred moving mean over ~2% of the points: shows the trend without an EMA's lag."""
    half = max(1, len(values) // 100)
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def title_lines(data: RunData) -> tuple[str, str]:
    cost = data.cost_usd
    head = f"{data.run_id}: {data.recipe} on {data.hardware}"
    steps = f"step {data.last_step:,}" + (f" of {data.total_steps:,}" if data.total_steps else "")
    parts = [steps, f"{human(data.tokens_seen)} tokens", duration(data.wall_seconds),
             f"{data.gpu_hours:,.2f} GPU-h", usd(cost) if cost is not None else "cost unknown (no price)"]
    if not data.finished:
        parts.append("in progress")
    return head, " | ".join(parts)


def plot_run(data: RunData, out: str | Path, log_x: bool = False, estimate: Optional[Estimate] = None) -> Path:
    """Draw the run's four panels into a PNG at `out`; return its path."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    (ax_loss, ax_hs), (ax_tps, ax_cost) = axes
    token_fmt = FuncFormatter(lambda x, _: human(x))

    _plot_loss(ax_loss, data)
    _plot_hellaswag(ax_hs, data)
    _format_token_axes(ax_loss, ax_hs, data, token_fmt, log_x)  # after both panels hold their data
    _plot_throughput(ax_tps, data, estimate, token_fmt)
    _plot_cost(ax_cost, data, estimate)
    _finish(fig, axes, data, out)
    plt.close(fig)
    return out


def _plot_loss(ax, data: RunData) -> None:
    """Loss against tokens: train (raw, and smoothed when dense), val, and GPT-2 124M's val loss."""
    train = [r for r in data.train if r.get("tokens_seen")]
    if train:
        x = [r["tokens_seen"] for r in train]
        y = [r["loss"] for r in train]
        smooth = len(y) >= 100  # fewer points are readable as they are
        ax.plot(x, y, color="tab:blue", alpha=0.25 if smooth else 1.0, linewidth=0.8 if smooth else 1.5,
                label="train loss")
        if smooth:
            ax.plot(x, _smooth(y), color="tab:blue", linewidth=1.8,
                    label="train loss (smoothed)")
        # The first steps sit near ln(50257) ~ 10.8; cap the axis so the interesting part is readable.
        tail = sorted(y[len(y) // 20:]) or y
        ax.set_ylim(bottom=min(min(y), GPT2_124M_VAL_LOSS) - 0.2, top=max(tail) + 0.5)
    if data.val:
        ax.plot([data.tokens_at(r["step"]) for r in data.val], [r["val_loss"] for r in data.val],
                "o-", color="tab:orange", markersize=4, linewidth=1.5,
                label=f"val loss (last {data.val[-1]['val_loss']:.3f})")
    ax.axhline(GPT2_124M_VAL_LOSS, color="tab:red", linestyle="--", linewidth=1,
               label=f"OpenAI GPT-2 124M val loss {GPT2_124M_VAL_LOSS} (FineWeb-Edu val)")
    ax.set_title("loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")


def _plot_hellaswag(ax, data: RunData) -> None:
    """HellaSwag against tokens, with GPT-2 124M, 1558M and chance; a hint when there is none."""
    if data.hellaswag:
        ax.plot([data.tokens_at(r["step"]) for r in data.hellaswag],
                [r["hellaswag_acc_norm"] for r in data.hellaswag], "o-", color="tab:green",
                label=f"this run (last {data.hellaswag[-1]['hellaswag_acc_norm']:.4f})")
    else:
        ax.text(0.5, 0.55, "no HellaSwag evaluations in metrics.jsonl\n(set hellaswag_every in the recipe,\n"
                "or run `gpt2cloud eval --hellaswag`)", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    for value, label, color in ((GPT2_1558M_HELLASWAG, "OpenAI GPT-2 1558M", "tab:purple"),
                                (GPT2_124M_HELLASWAG, "OpenAI GPT-2 124M", "tab:red"),
                                (CHANCE_HELLASWAG, "chance", "gray")):
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"{label} {value}")
    ax.set_ylim(0.2, 0.55)
    ax.set_title("HellaSwag acc_norm (validation)")
    ax.set_xlabel("tokens")


def _format_token_axes(ax_loss, ax_hs, data: RunData, token_fmt, log_x: bool) -> None:
    """The two token x-axes: human-readable ticks, optionally log-scaled."""
    from matplotlib.ticker import NullFormatter

    for ax in (ax_loss, ax_hs):  # the loss axis first: an empty HellaSwag panel copies its token range
        if ax is ax_hs and not data.hellaswag:
            ax.set_xlim(ax_loss.get_xlim())  # not matplotlib's meaningless 0..1
        ax.xaxis.set_major_formatter(token_fmt)
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(token_fmt)
            lo, hi = ax.get_xlim()
            # Within one decade there is a single major tick: label the minor ones too.
            ax.xaxis.set_minor_formatter(token_fmt if hi / max(lo, 1) < 20 else NullFormatter())


def _plot_throughput(ax, data: RunData, estimate: Optional[Estimate], token_fmt) -> None:
    """Tokens/s against step, with the steady median and the estimate."""
    rates = [(r["step"], r["tokens_per_second"]) for r in data.train if r.get("tokens_per_second")]
    if rates:
        ax.plot(*zip(*rates), color="tab:cyan", linewidth=1, label="tokens/s (all GPUs)")
        steady = data.steady_tokens_per_second()
        ax.axhline(steady, color="tab:blue", linewidth=1.5, label=f"median after warm-up {human(steady)}/s")
        top = max(max(r for _, r in rates), steady) * 1.15
        if estimate:
            ax.axhline(estimate.tokens_per_second, color="tab:red", linestyle="--", linewidth=1,
                       label=f"estimate {human(estimate.tokens_per_second)}/s")
            top = max(top, estimate.tokens_per_second * 1.15)
        ax.set_ylim(0, top)
    ax.yaxis.set_major_formatter(token_fmt)
    ax.set_title("throughput")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")


def _plot_cost(ax, data: RunData, estimate: Optional[Estimate]) -> None:
    """Money against step, with the estimate; without a price, wall time instead."""
    steps = [r["step"] for r in data.train]
    if data.train and data.train[-1].get("cost_usd") is not None:
        ax.plot(steps, [r.get("cost_usd", 0) for r in data.train], color="tab:green",
                label=f"spent {usd(data.cost_usd)}")
        if estimate:
            # the node bills from its boot (and the cost line counts it): compare with the all-in estimate
            total = estimate.all_in_cost_usd or estimate.cost_usd
            ax.axhline(total, color="tab:red", linestyle="--", linewidth=1,
                       label=f"estimated {'all-in ' if estimate.all_in_cost_usd else ''}total {usd(total)}")
        ax.set_ylabel("US dollars")
        ax.set_title("cost")
    elif data.train:
        unit, div = ("hours", 3600) if data.wall_seconds > 7200 else ("minutes", 60)
        ax.plot(steps, [r.get("elapsed_seconds", 0) / div for r in data.train], color="tab:green",
                label="elapsed (no price given, so no dollars)")
        ax.set_ylabel(unit)
        ax.set_title("wall time")
    ax.set_xlabel("step")


def _finish(fig, axes, data: RunData, out: Path) -> None:
    """Grids, legends (only where something is labelled), the run's title; write the PNG."""
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    head, sub = title_lines(data)
    fig.suptitle(f"{head}\n{sub}", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
