"""`gpt2cloud train`: train a recipe on this machine (CPU or local GPUs) with the bundled trainer."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from gpt2cloud.cli import completion
from gpt2cloud.cli.output import print_json


def train_command(
    recipe: str = typer.Argument(..., help="Recipe name (gpt2-tiny, gpt2-124m, ...) or path to a recipe YAML.",
                                 autocompletion=completion.recipes),
    data: str = typer.Option(..., "--data", help="Directory of llm.c .bin token shards (names with 'val' are validation)."),
    out: str = typer.Option(..., "--out", help="Run directory: config.json, metrics.jsonl, checkpoints/. New, empty, or this run's to resume it (see docs/training.md#resume)."),
    nproc: int = typer.Option(1, "--nproc", help="Processes (one per GPU; gloo ranks on CPU)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the recipe's number of steps."),
    schedule_steps: Optional[int] = typer.Option(None, "--schedule-steps", help="Length of the learning-rate schedule (default: the recipe's steps; --steps only stops early)."),
    resume: str = typer.Option("auto", "--resume", help="auto: continue from the newest checkpoint in --out; never: refuse if there is one."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model (default: the recipe's setting)."),
    price: Optional[float] = typer.Option(None, "--price", help="USD per GPU-hour, for cost_usd in the metrics."),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="Stop (with a checkpoint) before the cost passes this many USD; needs --price."),
    checkpoint_minutes: Optional[float] = typer.Option(None, "--checkpoint-minutes", help="Also checkpoint once this many minutes passed since the last checkpoint (default: the recipe's eval.checkpoint_minutes, 10)."),
    tracker: Optional[list[str]] = typer.Option(None, "--tracker", help="Also send the metrics to tensorboard (OUT/tensorboard), wandb or trackio; repeat for several (default: the recipe's eval.trackers). Needs the package here: pip install 'gpt2cloud\\[wandb]'."),
    notify: Optional[list[str]] = typer.Option(None, "--notify", help="A webhook URL told of the first step, the finish, a stop and a failure: Slack, Discord, ntfy or any URL that takes a JSON POST; repeat for several. Passed to the trainer in its environment, never printed (docs/cloud.md#notifications)."),
    as_json: bool = typer.Option(False, "--json", help="Send the trainer's output to stderr and end with one JSON object on stdout."),
):
    """Train locally under torchrun; Ctrl-C stops every process, rerunning resumes exactly."""
    from gpt2cloud.cli.output import fail
    from gpt2cloud.train import TrainingDiverged, train

    try:
        result = train(recipe, data, out, nproc=nproc, steps=steps, schedule_steps=schedule_steps, resume=resume,
                       compile=compile_, price=price, max_cost=max_cost, checkpoint_minutes=checkpoint_minutes,
                       trackers=tracker, notify=notify,
                       stream=sys.stderr if as_json else sys.stdout)
    except TrainingDiverged as e:  # one line like any error, with its own exit code (not a refusal's 2)
        fail(str(e).replace("[", r"\["), code=e.code)
    if as_json:
        print_json(result)
        return
    how = "stopped by the budget cap at" if result["budget_stop"] else "trained to"
    val = f", val loss {result['val_loss']:.4f}" if result["val_loss"] is not None else ""
    loss = f"{result['final_loss']:.4f}" if result["final_loss"] is not None else "n/a"
    typer.echo(f"{how} step {result['steps']}: loss {loss}{val}")
    typer.echo(f"checkpoint: {result['checkpoint']}")
    typer.echo(f"sample it:  gpt2cloud sample {out} --prompt \"Hello, I'm a language model,\"")
