"""`gpt2cloud report`: a Markdown page about one run, with the estimate next to what happened.

Sections: what ran (recipe, hardware, time, GPU-hours, dollars), estimate vs actual with the error
in percent, final losses and scores against OpenAI's GPT-2, samples from gibberish to English,
the plot, and the calibration point the run added (see gpt2cloud/runs/calibrate.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from gpt2cloud.cost.estimate import Estimate
from gpt2cloud.runs.calibrate import measured_mfu, measured_phases, record_calibration, record_phases
from gpt2cloud.runs.plot import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, GPT2_1558M_HELLASWAG, plot_run
from gpt2cloud.runs.rundata import RunData, run_estimate
from gpt2cloud.units import duration, human, usd

MAX_SAMPLES = 5


def error_percent(estimated: Optional[float], actual: Optional[float]) -> Optional[float]:
    """(actual - estimated) / estimated in percent: +20 means the run took or cost 20% more."""
    if not estimated or actual is None:
        return None
    return (actual - estimated) / estimated * 100


def comparison_rows(data: RunData, est: Estimate) -> tuple[list[tuple], str]:
    """(metric, estimated, actual, error %) rows; wall time and money prorated if the run stopped early."""
    share = 1.0
    note = ""
    if est.tokens and data.tokens_seen and data.tokens_seen != est.tokens:
        share = data.tokens_seen / est.tokens
        note = (f"The run covered {data.tokens_seen:,} of the {est.tokens:,} estimated tokens; "
                f"wall time, GPU-hours and dollars of the estimate are prorated to {share:.1%}.")
    rows = [
        ("wall time", est.wall_hours * 3600 * share, data.wall_seconds, duration),
        ("GPU-hours", est.gpu_hours * share, data.gpu_hours, lambda v: f"{v:,.2f}"),
        ("dollars", est.cost_usd * share, data.cost_usd, usd),
        ("tokens/s (all GPUs)", est.tokens_per_second, data.steady_tokens_per_second(), lambda v: human(v)),
        ("MFU", est.mfu, measured_mfu(data), lambda v: f"{v:.1%}"),
    ]
    out = []
    for name, e, a, fmt in rows:
        err = error_percent(e, a)
        out.append((name, fmt(e) if e is not None else "n/a", fmt(a) if a is not None else "n/a",
                    f"{err:+.1f}%" if err is not None else "n/a"))
    return out, note


def pick_samples(samples: list[dict], n: int = MAX_SAMPLES) -> list[dict]:
    """The first, the last and evenly spaced ones between: the path from gibberish to English."""
    if len(samples) <= n:
        return samples
    idx = sorted({round(i * (len(samples) - 1) / (n - 1)) for i in range(n)})
    return [samples[i] for i in idx]


def _quote(text: str) -> str:
    return "\n".join("> " + line if line.strip() else ">" for line in text.splitlines() or [""])


def render_report(data: RunData, est: Optional[Estimate], est_source: str, plot_path: Optional[Path],
                  calibration_note: str, base: Path) -> str:
    lines = [f"# Run report: {data.run_id}", ""]
    status = "finished" if data.finished else "in progress (or stopped before its end)"
    cost = data.cost_usd
    facts = [
        ("recipe", data.recipe),
        ("hardware", data.hardware + (f" at ${data.price_per_gpu_hour:.2f}/GPU-hour" if data.price_per_gpu_hour else "")),
        ("status", f"{status}: step {data.last_step:,}" + (f" of {data.total_steps:,}" if data.total_steps else "")),
        ("tokens", f"{data.tokens_seen:,}"),
        ("wall time", duration(data.wall_seconds)),
        ("GPU-hours", f"{data.gpu_hours:,.2f}"),
        ("dollars", usd(cost) if cost is not None else "unknown (no price per GPU-hour was given)"),
        ("run directory", str(data.out_dir)),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + [""]

    lines += ["## Estimate vs actual", ""]
    if est is None:
        lines += [f"No estimate: {est_source}.", ""]
    else:
        rows, note = comparison_rows(data, est)
        lines += [f"Estimate: {est_source}; MFU source: {est.mfu_source}.", ""]
        lines += ["| | estimated | actual | error |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {e} | {a} | {err} |" for name, e, a, err in rows]
        lines += ["", "Error = (actual - estimated) / estimated; actual tokens/s is the median after warm-up."]
        if note:
            lines += ["", note]
        lines += [""]

    lines += ["## Quality", "", "| | this run | OpenAI GPT-2 124M | OpenAI GPT-2 1558M |", "|---|---:|---:|---:|"]
    if data.train:
        tail = data.train[-10:]
        lines.append(f"| train loss (mean of last {len(tail)} steps) | {sum(r['loss'] for r in tail) / len(tail):.4f} | | |")
    if data.val:
        best = min(data.val, key=lambda r: r["val_loss"])
        lines.append(f"| val loss (step {data.val[-1]['step']:,}) | {data.val[-1]['val_loss']:.4f} | "
                     f"{GPT2_124M_VAL_LOSS} (FineWeb-Edu val) | |")
        lines.append(f"| best val loss (step {best['step']:,}) | {best['val_loss']:.4f} | | |")
    if data.hellaswag:
        last = data.hellaswag[-1]
        lines.append(f"| HellaSwag acc_norm (step {last['step']:,}) | {last['hellaswag_acc_norm']:.4f} | "
                     f"{GPT2_124M_HELLASWAG} | {GPT2_1558M_HELLASWAG} |")
    else:
        lines.append("| HellaSwag acc_norm | not measured (`gpt2cloud eval --hellaswag`) | "
                     f"{GPT2_124M_HELLASWAG} | {GPT2_1558M_HELLASWAG} |")
    lines.append("")

    lines += ["## Samples", ""]
    if not data.samples:
        lines += ["No samples in metrics.jsonl.", ""]
    for s in pick_samples(data.samples):
        lines += [f"**step {s['step']:,}** ({human(data.tokens_at(s['step']))} tokens):", "", _quote(s["sample"]), ""]

    if plot_path is not None:
        rel = Path(plot_path).resolve()
        try:
            rel = rel.relative_to(base.resolve())
        except ValueError:
            pass
        lines += ["## Plot", "", f"![training curves]({rel.as_posix()})", ""]
    lines += phase_lines(data, est)
    lines += ["## Calibration", "", f"Measured MFU: {calibration_note}.", ""]
    return "\n".join(lines)


def phase_lines(data: RunData, est: Optional[Estimate]) -> list[str]:
    """The whole bill, phase by phase: what the estimate said, what the node's timeline measured."""
    actual = measured_phases(data)
    if est is None or not est.breakdown_hours or not actual:
        why = "no node timeline (a run of `gpt2cloud train`)" if not actual else "no all-in estimate"
        return ["## The whole bill, phase by phase", "", f"Not available: {why}.", ""]
    lines = ["## The whole bill, phase by phase", "", "| phase | estimated | actual | error |", "|---|---:|---:|---:|"]
    for phase, hours in est.breakdown_hours.items():
        got = actual.get(phase)
        err = error_percent(hours, got)
        lines.append(f"| {phase} | {duration(hours * 3600)} | {duration(got * 3600) if got is not None else 'n/a'} | "
                     f"{f'{err:+.1f}%' if err is not None else 'n/a'} |")
    node = data.metrics.node_seconds() / 3600 + actual.get("provisioning", 0.0)
    est_node = est.all_in_hours - est.breakdown_hours.get("idle", 0.0)  # the idle minutes come after the timeline
    err = error_percent(est_node, node)
    lines.append(f"| **all-in, without idle** | {duration(est_node * 3600)} | {duration(node * 3600)} | "
                 f"{f'{err:+.1f}%' if err is not None else 'n/a'} |")
    lines += ["", "Actual: the node's timeline (setup, data) and the trainer's own durations (compile = start-up to the "
              "first step, training = the steps, evals = val loss, HellaSwag and checkpoints), over every attempt; "
              "all-in = node time plus provisioning. Idle is after the last push, so it has no actual.", ""]
    return lines


def write_report(data: RunData, out: Optional[str | Path] = None, calibrate: bool = True) -> tuple[Path, Optional[Path]]:
    """Write the Markdown report (default OUT/report.md) and its plot next to it; return both paths."""
    out = Path(out) if out else data.out_dir / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    # The estimate first: a computed one must not already include this run's own calibration point.
    est, est_source = run_estimate(data)
    plot_path = plot_run(data, out.with_suffix(".png"), estimate=est) if data.train else None
    if calibrate:
        _, calibration_note = record_calibration(data)
        _, phases_note = record_phases(data)
        calibration_note = f"{calibration_note.rstrip('.')}; phases: {phases_note}"
    else:
        calibration_note = "not recorded (calibration disabled)"
    out.write_text(render_report(data, est, est_source, plot_path, calibration_note.rstrip("."), out.parent),
                   encoding="utf-8")
    return out, plot_path
