"""`gpt2cloud export --hf DIR [--push-to-hub ORG/NAME]`: a checkpoint as a transformers GPT2LMHeadModel
directory with its model card, optionally uploaded to the Hugging Face Hub."""

from __future__ import annotations

from typing import Optional

import typer

from gpt2cloud.cli.output import print_json


def export_command(
    checkpoint: str = typer.Argument(..., help="A checkpoint dir or a run's OUT dir (its newest checkpoint)."),
    hf: str = typer.Option(..., "--hf", help="Directory to write (config, safetensors, tokenizer files, README.md model card, gpt2cloud_export.json): new, empty, or an earlier export, which is replaced."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="ORG/NAME", help="Then upload the directory to this Hugging Face Hub model repo (created if new; one that gpt2cloud did not write is refused). Needs HF_TOKEN, a write token, in the environment."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Export to Hugging Face format with a model card: GPT2LMHeadModel.from_pretrained(DIR) loads it."""
    from gpt2cloud.checkpoints.export import export_hf
    from gpt2cloud.errors import UserError
    from gpt2cloud.runs.card import write_card

    token = None
    if push_to_hub is not None:
        from gpt2cloud.checkpoints.hub_push import preflight

        # before the export: a bad id, a missing or refused token, or a repo not ours cost no export
        token = preflight(push_to_hub, private=private)
    elif private:
        raise UserError("--private: only with --push-to-hub ORG/NAME")

    r = export_hf(checkpoint, hf, card=lambda out, info: write_card(out, info, repo_id=push_to_hub))
    if push_to_hub is not None:
        from gpt2cloud.checkpoints.hub_push import push_export

        if not as_json:
            typer.echo(f"exported {r['checkpoint']} to {r['dir']}; pushing to {push_to_hub} ...")
        r["pushed"] = push_export(hf, push_to_hub, token, private=private)
    if as_json:
        print_json(r)
        return
    step = f" (step {r['step']:,})" if r["step"] is not None else ""
    if push_to_hub is None:
        typer.echo(f"exported {r['checkpoint']}{step} to {r['dir']}: {', '.join(r['files'])}")
        d = r["dir"]
        typer.echo(f'load it: GPT2LMHeadModel.from_pretrained("{d}"), GPT2Tokenizer.from_pretrained("{d}")')
        return
    p = r["pushed"]
    deleted = f"; removed {', '.join(p['deleted'])} of an earlier push" if p["deleted"] else ""
    typer.echo(f"pushed {len(p['files'])} files{step} to {p['url']} (commit {p['commit'][:12]}){deleted}")
    typer.echo(f'load it: AutoModelForCausalLM.from_pretrained("{push_to_hub}")')
