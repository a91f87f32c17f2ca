"""`gpt2cloud export --hf DIR`: a checkpoint as a transformers GPT2LMHeadModel directory."""

from __future__ import annotations

import typer

from gpt2cloud.cli.output import print_json


def export_command(
    checkpoint: str = typer.Argument(..., help="A checkpoint dir or a run's OUT dir (its newest checkpoint)."),
    hf: str = typer.Option(..., "--hf", help="Directory to write (config, safetensors, tokenizer files, gpt2cloud_export.json): new, empty, or an earlier export, which is replaced."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Export to Hugging Face format: GPT2LMHeadModel.from_pretrained(DIR) loads it."""
    from gpt2cloud.checkpoints.export import export_hf

    r = export_hf(checkpoint, hf)
    if as_json:
        print_json(r)
        return
    step = f" (step {r['step']:,})" if r["step"] is not None else ""
    typer.echo(f"exported {r['checkpoint']}{step} to {r['dir']}: {', '.join(r['files'])}")
    typer.echo(f'load it: GPT2LMHeadModel.from_pretrained("{r["dir"]}"), GPT2Tokenizer.from_pretrained("{r["dir"]}")')
