"""`gpt2cloud eval`: HellaSwag and validation loss of a checkpoint, next to OpenAI's GPT-2."""

from __future__ import annotations

from typing import Optional

import typer

from gpt2cloud.cli.output import print_json


def eval_command(
    checkpoint: str = typer.Argument(..., help="A checkpoint dir, a run's OUT dir (its newest checkpoint) "
                                               "or a Hugging Face GPT-2 dir."),
    hellaswag: Optional[str] = typer.Option(None, "--hellaswag", help="HellaSwag JSONL (hellaswag_val.jsonl)."),
    val: Optional[str] = typer.Option(None, "--val", help="Dir, shard file or storage URL with *val*.bin shards."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N HellaSwag examples."),
    val_steps: int = typer.Option(20, "--val-steps", help="Validation batches to average."),
    val_batch: int = typer.Option(8, "--val-batch", help="Sequences per validation batch."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if present)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Score a checkpoint: HellaSwag (completion style, acc and acc_norm) and val loss."""
    from gpt2cloud.checkpoints.score import evaluate
    from gpt2cloud.runs.plot import GPT2_124M_HELLASWAG, GPT2_124M_VAL_LOSS, GPT2_1558M_HELLASWAG

    r = evaluate(checkpoint, hellaswag=hellaswag, val=val, limit=limit, val_steps=val_steps,
                 val_batch=val_batch, device=device)
    if as_json:
        print_json(r)
        return
    step = f" (step {r['step']:,})" if r["step"] is not None else ""
    typer.echo(f"checkpoint  {r['checkpoint']}{step}, {r['params']:,} parameters, on {r['device']}")
    if "hellaswag" in r:
        h = r["hellaswag"]
        typer.echo(f"HellaSwag   acc_norm {h['acc_norm']:.4f}  acc {h['acc']:.4f}  on {h['n']:,} examples   "
                   f"(OpenAI GPT-2 124M {GPT2_124M_HELLASWAG}, 1558M {GPT2_1558M_HELLASWAG} acc_norm on all 10,042)")
    if "val" in r:
        v = r["val"]
        typer.echo(f"val loss    {v['loss']:.4f}  over {v['steps'] * v['batch'] * v['T']:,} tokens   "
                   f"(OpenAI GPT-2 124M {GPT2_124M_VAL_LOSS} on the FineWeb-Edu val shard)")
