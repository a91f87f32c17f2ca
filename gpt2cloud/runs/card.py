"""The model card `gpt2cloud export` writes into an export directory as README.md (the Hub's repo page).

Front matter the Hub reads (license, library, pipeline, tags, the dataset when it is a Hub dataset),
then what is known of the model: its recipe, tokens, hardware, wall time and cost, its val loss and
HellaSwag beside OpenAI's GPT-2 of the same size, the training curves (the plot of `gpt2cloud plot`,
as training_curves.png beside it) and how to load it with transformers. Every figure names where it
comes from; a figure nothing records is "unknown", never guessed.

The figures are the run's as it stood at the exported checkpoint's step: a checkpoint in a run's OUT
(OUT/checkpoints/step_N with OUT/metrics.jsonl) gets the metrics up to step N; a checkpoint without
metrics gets what its manifest.json and trainer_state.json say; an HF-format directory only its shape.
This module sits in runs/ (not beside export.py in checkpoints/) because it reads a run's metrics and
draws with runs/plot.py; export.py takes it as a callback and knows nothing of runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import yaml

from gpt2cloud.checkpoints.export import CARD_FILE, CARD_MARKER, PLOT_FILE
from gpt2cloud.errors import UserError
from gpt2cloud.runs.plot import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, GPT2_1558M_HELLASWAG, plot_run
from gpt2cloud.runs.rundata import RunData, load_run
from gpt2cloud.store import atomic_write
from gpt2cloud.store.layout import CHECKPOINTS, MANIFEST, METRICS
from gpt2cloud.units import duration, human, usd
from model.metrics import RunMetrics

VAL_REF_SOURCE = "OpenAI's released GPT-2 checkpoint, val loss on the FineWeb-Edu val shard (llm.c / build-nanogpt)"
HS_REF_SOURCE = ("OpenAI's released GPT-2 checkpoints, completion-style acc_norm on HellaSwag's 10,042 validation "
                 "examples (build-nanogpt's scoring, as `gpt2cloud eval` scores; the Eleuther harness reports "
                 "other numbers)")
# OpenAI's GPT-2 by size: the figures gpt2cloud keeps (gpt2cloud/runs/plot.py); a size or metric missing
# here has no published figure the project trusts, and the card says so instead of filling one in.
GPT2_REFERENCE = {
    "124M": {"val_loss": GPT2_124M_VAL_LOSS, "hellaswag": GPT2_124M_HELLASWAG},
    "1558M": {"hellaswag": GPT2_1558M_HELLASWAG},
}
PROMPT = "Hello, I'm a language model,"


def write_card(out: Path, export: dict, repo_id: Optional[str] = None) -> list[str]:
    """README.md, and training_curves.png when the run's metrics are known, into the export dir `out`
    (export_hf's result describes the export); returns the names written."""
    run = run_at_step(Path(export["checkpoint"]), export.get("step"))
    written = []
    if run is not None:
        plot_run(run, out / PLOT_FILE)
        written.append(PLOT_FILE)
    atomic_write(out / CARD_FILE, card_text(export, run, PLOT_FILE in written, repo_id))
    return [CARD_FILE, *written]


def run_at_step(checkpoint: Path, step: Optional[int]) -> Optional[RunData]:
    """The run a trainer checkpoint (OUT/checkpoints/step_N) belongs to, with its metrics cut at step N:
    tokens, wall time, cost and scores are then those of the exported weights. None without metrics."""
    if step is None or checkpoint.parent.name != CHECKPOINTS:
        return None
    out = checkpoint.parent.parent
    if not (out / METRICS).is_file():
        return None
    try:
        data = load_run(str(out))
    except UserError:
        return None
    rows = [r for r in data.metrics.rows if _before(r, step)]
    cut = RunData(data.out_dir, RunMetrics.from_rows(rows), spec=data.spec, record=data.record)
    return cut if cut.train else None


def _before(row: dict, step: int) -> bool:
    """A metrics line the run had written by `step`. Events that carry no money (the run's end) are
    kept: without them the plot would call a finished run's earlier checkpoint "in progress"."""
    at = row.get("step")
    if not isinstance(at, (int, float)) or at <= step:
        return True
    return "event" in row and "cost_usd" not in row


def gpt2_size(model: dict) -> Optional[str]:
    """'124M' ... '1558M' when the shape is one of GPT-2's, read from the faithful bundled recipes."""
    from gpt2cloud.cost.recipes import known_recipes, load_recipe

    for name in known_recipes():
        m = re.fullmatch(r"gpt2-(\d+)m", name)
        if m:
            spec = load_recipe(name).model
            if (spec.n_layer, spec.n_head, spec.n_embd) == (model["n_layer"], model["n_head"], model["n_embd"]):
                return f"{m[1]}M"
    return None


def card_text(export: dict, run: Optional[RunData], with_plot: bool, repo_id: Optional[str]) -> str:
    """The card's Markdown; `repo_id` (a push) names the model in the title and the loading snippet."""
    model = export["model"]
    size = gpt2_size(model)
    name = repo_id.split("/", 1)[1] if repo_id else (run.run_id if run else Path(export["dir"]).resolve().name)
    shape = (f"{model['n_layer']} layers, {model['n_head']} heads, width {model['n_embd']}, context "
             f"{model['block_size']:,}; {export['params']:,} parameters")
    kind = f"GPT-2 {size}" if size else "GPT-2-architecture"
    ours = (Path(export["checkpoint"]) / MANIFEST).is_file()  # a gpt2cloud checkpoint, not an HF dir
    how = "trained from scratch with gpt2cloud" if ours else "exported by gpt2cloud from an HF-format directory"
    lines = ["---", _front_matter(run).rstrip(), "---", CARD_MARKER, "", f"# {name}", "",
             f"A {kind} language model ({shape}), {how}, for transformers (GPT2LMHeadModel, GPT-2's "
             "tokenizer).", ""]
    lines += ["## Training", "", "| | | source |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {src} |" for k, v, src in training_facts(export, run)] + [""]
    lines += quality_lines(run, size)
    if with_plot:
        lines += ["## Training curves", "", f"![training curves]({PLOT_FILE})", "",
                  f"Drawn by `gpt2cloud plot` from the run's {METRICS} up to step {run.last_step:,}: loss and "
                  "HellaSwag against tokens (dashed: OpenAI's GPT-2, sources above), tokens/s and dollars "
                  "against steps.", ""]
    lines += usage_lines(repo_id or export["dir"])
    return "\n".join(lines)


def _front_matter(run: Optional[RunData]) -> str:
    meta = {"license": "mit", "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["gpt2", "text-generation", "gpt2cloud"]}
    dataset = _hub_dataset(run)
    if dataset:
        meta["datasets"] = [dataset]
    return yaml.safe_dump(meta, sort_keys=False)


def _hub_dataset(run: Optional[RunData]) -> Optional[str]:
    """The Hub dataset the run read (--data hf://ORG/REPO); the only data a card can name for sure."""
    url = run.spec.data_url if run is not None and run.spec is not None else ""
    if not url.startswith("hf://"):
        return None
    from gpt2cloud.store import StorageError
    from gpt2cloud.store.hub import parse_hub_url

    try:
        loc = parse_hub_url(url)
    except StorageError:
        return None
    return loc.repo_id if loc.repo_type == "dataset" else None


def training_facts(export: dict, run: Optional[RunData]) -> list[tuple[str, str, str]]:
    """(what, value, where it comes from) rows: the run's metrics at the step, else the checkpoint's files."""
    if run is None:
        return _checkpoint_facts(export)
    step = export["step"]
    at = f"{METRICS} at step {step:,}"
    spec_src = "run.json (the launch)" if run.spec else f"{METRICS} (the trainer's config)"
    recipe, recipe_src = run.recipe, spec_src
    if recipe == "unknown recipe":  # neither run.json nor the metrics' config name it: the checkpoint may
        recipe = _json(Path(export["checkpoint"]) / MANIFEST).get("recipe") or "unknown"
        recipe_src = f"the checkpoint's {MANIFEST}"
    total = f" of {run.total_steps:,}" if run.total_steps else ""
    data = _data_value(run)
    cost = run.cost_usd
    if cost is None:
        cost_value, cost_src = "unknown", "no price per GPU-hour was recorded for this run"
    elif run.train[-1].get("cost_usd") is not None:
        cost_value, cost_src = usd(cost), f"{at}: the trainer's own count (what its --max-cost cap uses)"
    else:
        cost_value = usd(cost)
        cost_src = f"wall time x {run.world_size} GPUs x ${run.price_per_gpu_hour:g}/GPU-hour ({spec_src})"
    return [
        ("run", run.run_id, spec_src if run.spec else "the run directory's name"),
        ("recipe", recipe, recipe_src),
        ("data", data[0], data[1]),
        ("checkpoint", f"step {step:,}{total}", f"the checkpoint's {MANIFEST}"),
        ("tokens trained", f"{run.tokens_seen:,} ({human(run.tokens_seen)})", at),
        ("hardware", run.hardware, "run.json (the launch's GPUs)" if run.gpu_type else f"{METRICS} (start event)"),
        ("wall time", duration(run.wall_seconds),
         f"{at}: the trainer's elapsed time over all restarts (provisioning and setup not included)"),
        ("cost", cost_value, cost_src),
    ]


def _data_value(run: RunData) -> tuple[str, str]:
    """The training data as the card may show it: a Hub dataset by name; a bucket or local path is
    the user's private location and stays off a page that may be public."""
    if run.spec is None or not run.spec.data_url:
        return "unknown", f"no run.json beside {METRICS}"
    url = run.spec.data_url
    if url.startswith("hf://"):
        return url, "run.json (the launch's --data)"
    return f"not published ({url.split('://')[0]}:// storage)", "run.json (the launch's --data)"


def _checkpoint_facts(export: dict) -> list[tuple[str, str, str]]:
    """What a checkpoint without its run's metrics says of itself (manifest.json, trainer_state.json)."""
    path = Path(export["checkpoint"])
    manifest, state = _json(path / MANIFEST), _json(path / "trainer_state.json")
    if not manifest:
        why = "an HF-format directory carries no training record"
        return [(k, "unknown", why) for k in ("recipe", "tokens trained", "hardware", "wall time", "cost")]
    src_m, src_s = f"the checkpoint's {MANIFEST}", "the checkpoint's trainer_state.json"
    tokens, elapsed = state.get("tokens_seen"), state.get("elapsed_seconds")
    per_step = (manifest.get("config") or {}).get("tokens_per_step")
    tokens_src = src_s
    if not tokens and per_step and export["step"]:
        tokens, tokens_src = export["step"] * per_step, f"step x tokens per step of the config in {src_m}"
    no_metrics = f"no {METRICS} beside the checkpoint"
    return [
        ("recipe", manifest.get("recipe") or "unknown", src_m),
        ("checkpoint", f"step {export['step']:,}", src_m),
        ("tokens trained", f"{tokens:,} ({human(tokens)})" if tokens else "unknown", tokens_src),
        ("hardware", f"unknown (world size {manifest.get('world_size', '?')})", f"{src_m}; {no_metrics}"),
        ("wall time", duration(elapsed) if elapsed else "unknown", src_s),
        ("cost", "unknown", f"{no_metrics} (the run's price and GPUs)"),
    ]


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def quality_lines(run: Optional[RunData], size: Optional[str]) -> list[str]:
    """Val loss and HellaSwag beside OpenAI's GPT-2 of the same size (124M for scale when none is)."""
    ref_size = size or "124M"
    ref = GPT2_REFERENCE.get(ref_size, {})
    note = "" if size else " (for scale: this model is not one of GPT-2's sizes)"
    rows = [("val loss", _val_cell(run), ref.get("val_loss"), VAL_REF_SOURCE),
            ("HellaSwag acc_norm", _hellaswag_cell(run), ref.get("hellaswag"), HS_REF_SOURCE)]
    lines = ["## Evaluation", "", f"| | this model | OpenAI GPT-2 {ref_size}{note} |", "|---|---:|---:|"]
    lines += [f"| {what} | {mine} | {theirs if theirs is not None else 'n/a'} |" for what, mine, theirs, _ in rows]
    ours = (f"the run's {METRICS}: the trainer's own evaluations up to the exported step" if run is not None
            else f"none recorded: no {METRICS} beside this checkpoint")
    lines += ["", "Sources:", "", f"- this model: {ours};"]
    for what, _, theirs, source in rows:
        source = source if theirs is not None else f"no published figure in gpt2cloud's reference table for {ref_size}"
        lines.append(f"- GPT-2 {ref_size} {what}: {source};")
    lines[-1] = lines[-1][:-1] + "."
    lines += ["", "A val loss compares only on the same val shard (GPT-2's is FineWeb-Edu's).", ""]
    return lines


def _val_cell(run: Optional[RunData]) -> str:
    if run is None or not run.val:
        return "not measured (`gpt2cloud eval --val`)"
    last = run.val[-1]
    return f"{last['val_loss']:.4f} (step {last['step']:,})"


def _hellaswag_cell(run: Optional[RunData]) -> str:
    if run is None or not run.hellaswag:
        return "not measured (`gpt2cloud eval --hellaswag`)"
    last = run.hellaswag[-1]
    n = f", {last['hellaswag_n']:,} examples" if last.get("hellaswag_n") else ""
    return f"{last['hellaswag_acc_norm']:.4f} (step {last['step']:,}{n})"


def usage_lines(where: str) -> list[str]:
    return ["## How to use", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
            f'generator = pipeline("text-generation", model="{where}")',
            f'print(generator("{PROMPT}", max_new_tokens=32, do_sample=True, top_k=50)[0]["generated_text"])', "",
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            f'model = AutoModelForCausalLM.from_pretrained("{where}")',
            "```", "",
            "GPT-2's tokenizer (50,257 tokens); generation stops at `<|endoftext|>`.", ""]
