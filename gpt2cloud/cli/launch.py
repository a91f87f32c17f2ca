"""`gpt2cloud launch`: estimate, confirm, and start a training run on a cloud (SkyPilot) or this machine."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from gpt2cloud.cli import completion
from gpt2cloud.cli.output import fail, print_json, show_task
from gpt2cloud.errors import UserError
from gpt2cloud.units import usd


def _print_plan(p, console: Console) -> None:
    from gpt2cloud.cli.estimate import render

    render(p.est, console)
    from gpt2cloud.names import ANY, LOCAL

    where = {LOCAL: "this machine (CPU ranks, as SkyPilot would run each node)",
             ANY: f"the cheapest of {', '.join(p.job.resources.clouds) or 'the enabled clouds'} (SkyPilot any_of)"}
    s = p.spec
    console.print(f"[bold]launch[/]         run [bold]{s.run_id}[/] on {where.get(s.infra, s.infra)}"
                  f"{' (spot, managed job: resumes after preemption)' if s.spot else ''}")
    console.print(f"[bold]data / bucket[/]  {s.data_url} -> {s.run_url}")
    if not s.spot and not s.local:
        console.print(f"[bold]teardown[/]       autostop after {s.idle_minutes} idle minutes, then down "
                      "(nothing keeps billing)")
    retry = s.retry_minutes
    if retry:
        console.print(f"[bold]capacity[/]       SkyPilot retries until the GPUs come up, for at most {retry} min; "
                      + ("then the managed job is cancelled" if s.spot else "then the launch is cancelled and what "
                         "it made removed"))
    if s.image:
        console.print(f"[bold]node image[/]     {s.image} (its CUDA torch is used as is)")
    if s.max_hours:
        console.print(f"[bold]time limit[/]     the trainer stops before {s.max_hours:g} h")
    if s.max_cost_usd:
        console.print(f"[bold]budget[/]         the trainer stops before {usd(s.max_cost_usd)} "
                      f"(estimate: {usd(p.est.cost_usd)})")
    if p.train_cfg.trackers:
        console.print(f"[bold]trackers[/]       {', '.join(p.train_cfg.trackers)} (and metrics.jsonl)")
    hosts = _notify_hosts(p)
    if hosts:
        console.print(f"[bold]notify[/]         {', '.join(hosts)} (first step, end, stops, failures)")
    if p.secrets:
        console.print(f"[bold]secrets[/]        {', '.join(sorted(p.secrets))} (passed as SkyPilot secrets, "
                      "never written or printed)")


def _notify_hosts(p) -> list[str]:
    """--notify's URLs as the launch shows them: scheme and host only (a webhook URL is a credential)."""
    from model.notify import NOTIFY_ENV, redact

    return [redact(u) for u in p.secrets.get(NOTIFY_ENV, "").splitlines()]


def _settings(**flags) -> dict:
    """The launch's defaultable values (gpt2cloud/settings.py): the flag, else `gpt2cloud config`'s, else built in."""
    from gpt2cloud import settings

    chosen = settings.resolve(**flags)
    if chosen["bucket"].value is None:
        raise UserError("--bucket: where the run's outputs go is not set; pass --bucket s3://BUCKET/PREFIX, or set it "
                        "once: gpt2cloud config set bucket s3://BUCKET/PREFIX")
    return chosen


def _sources(chosen: dict, p) -> str:
    """`--dry-run`: where each default-able value came from, as YAML comments below the task."""
    from gpt2cloud import settings
    from model.notify import redact

    # what the plan made of a value the launch decides (gpus: H100:8, or this machine's on --infra local)
    planned = {"bucket": p.spec.bucket, "infra": p.spec.infra, "gpus": p.job.resources.accelerators,
               "idle-minutes": p.spec.idle_minutes, "tracker": p.train_cfg.trackers,
               "notify": [redact(u) for u in chosen["notify"].value]}  # a webhook URL is a credential
    lines = ["# Settings (a flag wins over `gpt2cloud config`, which wins over the built-in default):"]
    for name, s in chosen.items():
        value = planned.get(name, s.value)
        source = {settings.FLAG: f"flag {settings.KEYS[name].flag}", settings.CONFIG: f"config file {settings.path()}",
                  settings.DEFAULT: "built-in default"}[s.source]
        if name == "tracker" and s.source == settings.DEFAULT and value:
            source = f"recipe {p.spec.recipe} (eval.trackers)"  # no flag, no config: the recipe's list
        lines.append(f"#   {name:<13} {_printable(settings.describe(name, value)):<24} {_printable(source)}")
    return "\n".join(lines) + "\n"


def _printable(text: str) -> str:
    # a newline in a value (a bucket URL typed with one) must not end the comment and become YAML
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _start(p):
    """start.start(p). SIGTERM or SIGHUP during it ends the launch as Ctrl-C does (the backend says above what
    it cancelled and removed, or what may still bill), then the command with one line and the signal's status."""
    from gpt2cloud.launch import start

    try:
        return start.start(p)
    except start.Terminated as e:
        fail(f"launch of {p.run_id} stopped by {e.signal_name} (a closed terminal or `kill`), like Ctrl-C: see "
             f"above for what was cancelled and removed; `gpt2cloud status {p.run_id}` shows what is left",
             code=e.exit_code)


def launch_command(
    recipe: str = typer.Argument(..., help="Recipe name (gpt2-124m, gpt2-tiny, ...) or path to a recipe YAML.",
                                 autocompletion=completion.recipes),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU type and count per node, e.g. H100:8, or "
                                       "candidates SkyPilot picks from, e.g. H100:8,A100-80GB:8 (estimated and capped at "
                                       "the dearest). Default: H100:8; with --infra local this machine's GPUs, else its "
                                       "CPU cores."),
    nodes: int = typer.Option(1, "--nodes", help="Number of nodes (torchrun over all of them)."),
    infra: Optional[str] = typer.Option(None, "--infra", help="lambda, aws, gcp, azure, kubernetes, runpod, ... "
                                        "(optionally /region), or local; default: any enabled cloud."),
    spot: bool = typer.Option(False, "--spot", help="Spot instances as a managed job (resumes after preemption)."),
    data: str = typer.Option(..., "--data", help="Token shards: s3://... with a manifest, hf://ORG/REPO\\[/PATH]\\[@REV] "
                                          "(Hugging Face Hub), file:// for local."),
    bucket: Optional[str] = typer.Option(None, "--bucket", help="Where the run's checkpoints, metrics and logs go "
                                         "(default: `gpt2cloud config set bucket s3://...`)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run id (and cluster name); the same id resumes."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the recipe's steps."),
    schedule_steps: Optional[int] = typer.Option(None, "--schedule-steps", help="Length of the learning-rate "
                                                 "schedule (default: the recipe's steps; --steps only stops early)."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="Override the micro-batch per GPU."),
    tokens_per_step: Optional[int] = typer.Option(None, "--tokens-per-step", help="Override tokens per step."),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="Budget in USD: the trainer stops before it."),
    max_hours: Optional[float] = typer.Option(None, "--max-hours", help="Wall-time limit in hours: the trainer "
                                              "stops (with a checkpoint) before it; the node kills it soon after."),
    idle_minutes: Optional[int] = typer.Option(None, "--idle-minutes", help="Tear the cluster down after this many "
                                               "idle minutes (default: 10)."),
    price: Optional[float] = typer.Option(None, "--price", help="USD per GPU-hour (default: bundled table)."),
    image: Optional[str] = typer.Option(None, "--image", help="Node image: docker:REPO:TAG with CUDA torch inside "
                                        "(setup skips the torch download) or a cloud image id (SkyPilot image_id)."),
    push_every: int = typer.Option(60, "--push-every", help="Seconds between syncs of OUT to the bucket."),
    checkpoint_minutes: Optional[float] = typer.Option(None, "--checkpoint-minutes", help="Also checkpoint once "
                                                       "this many minutes passed since the last checkpoint: what "
                                                       "a preemption may lose (default: the recipe's "
                                                       "eval.checkpoint_minutes, 10)."),
    retry_until_up: bool = typer.Option(False, "--retry-until-up", help="No capacity: SkyPilot retries until the "
                                        "GPUs come up (nothing bills meanwhile), for at most --retry-minutes; then "
                                        "the launch is cancelled and what it made removed."),
    retry_minutes: Optional[float] = typer.Option(None, "--retry-minutes", help="With --retry-until-up: the most "
                                                  "minutes to retry (default 60, at most 1440)."),
    interconnect_gbps: Optional[float] = typer.Option(None, "--interconnect-gbps", help="With --nodes > 1: the "
                                                      "network between nodes in Gb/s for the estimate and the cap "
                                                      "(default: the interconnect table's figure for the instance)."),
    tracker: Optional[list[str]] = typer.Option(None, "--tracker", help="Also send the metrics to tensorboard, wandb "
                                                "or trackio; repeat for several (default: `gpt2cloud config set "
                                                "tracker`, else the recipe's eval.trackers). The node installs its "
                                                "package; wandb needs WANDB_API_KEY (or WANDB_MODE=offline)."),
    notify: Optional[list[str]] = typer.Option(None, "--notify", help="A webhook URL told of the first step, the "
                                               "finish, a stop, a failure, a stall, a preemption and a recovery: "
                                               "Slack, Discord, ntfy or any URL that takes a JSON POST; repeat for "
                                               "several (default: `gpt2cloud config set notify URL`). Travels as a "
                                               "SkyPilot secret, never printed."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the SkyPilot YAML (secrets redacted); launch nothing."),
    export_yaml: Optional[Path] = typer.Option(None, "--export-yaml", help="Write the SkyPilot YAML for `sky launch "
                                               "FILE` (secrets redacted); launch nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Estimate, confirm and launch a training run: SkyPilot cluster, managed spot job, or this machine.

    --bucket, --infra, --gpus, --max-cost, --idle-minutes, --tracker and --notify not given take their defaults from
    `gpt2cloud config` (a flag always wins); --dry-run shows where each came from."""
    from gpt2cloud import home, settings
    from gpt2cloud.launch import start
    from gpt2cloud.launch.plan import plan
    from gpt2cloud.names import ANY

    offline = dry_run or export_yaml is not None
    # before anything is written anywhere (the bucket included): the registry and the build live there,
    # and the config file the defaults come from
    home.check_usable(write=not dry_run)
    chosen = _settings(bucket=bucket, infra=infra, gpus=gpus, max_cost=max_cost, idle_minutes=idle_minutes,
                       tracker=tracker, notify=notify)
    try:
        p = plan(recipe, chosen["gpus"].value, nodes=nodes, infra=chosen["infra"].value, spot=spot, data=data,
                 bucket=chosen["bucket"].value, name=name, steps=steps, schedule_steps=schedule_steps,
                 max_cost=chosen["max-cost"].value, max_hours=max_hours, idle_minutes=chosen["idle-minutes"].value,
                 price=price, push_every=push_every,
                 offline=offline, micro_batch=micro_batch, tokens_per_step=tokens_per_step,
                 image=image, checkpoint_minutes=checkpoint_minutes, retry_until_up=retry_until_up,
                 retry_minutes=retry_minutes, interconnect_gbps=interconnect_gbps, notify=chosen["notify"].value,
                 # neither flag nor config: the recipe's eval.trackers
                 trackers=chosen["tracker"].value if chosen["tracker"].source != settings.DEFAULT else None)
    except UserError as e:
        raise settings.blame(e, chosen) from None
    console = Console(stderr=as_json)
    for w in p.warnings:
        Console(stderr=True).print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    if p.spec.infra == ANY and not p.job.resources.clouds:
        Console(stderr=True).print("note: no cloud is enabled here (`sky check`); the task names no infra, so "
                                   "SkyPilot picks the cheapest enabled cloud at `sky launch`")
    if offline:
        show_task(p.task_cfg, run_id=p.run_id, local=p.spec.local, dry_run=dry_run, export_yaml=export_yaml,
                  write_workdir=lambda: start.write_build(p), as_json=as_json, estimate=p.est.to_dict(),
                  retry=p.spec.retry_minutes > 0)
        if dry_run and not as_json:
            sys.stdout.write(_sources(chosen, p))  # YAML comments after the task: stdout stays its YAML
        return

    p = start.preflight(p)
    if not as_json or not yes:
        _print_plan(p, Console(stderr=True) if as_json else console)
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("not launching without confirmation: add --yes (stdin is not a terminal)")
        if not typer.confirm(f"Launch {p.run_id} (estimated {usd(p.est.cost_usd)})?", default=False, err=True):
            raise UserError("not launched (answered no)")
    _say_launched(_start(p), p, console, as_json)


def _say_launched(record, p, console: Console, as_json: bool) -> None:
    """What was launched, and the commands that watch and end it."""
    s = record.spec
    if as_json:
        print_json({"run": s.run_id, "kind": s.kind, "infra": s.infra, "run_url": s.run_url,
                    **{k: getattr(record.handle, k, None) for k in ("cluster", "job_id", "pid")},
                    "estimate": p.est.to_dict()})
        return
    console.print(f"[green]launched[/] {s.run_id} ({s.kind}); outputs go to {s.run_url}")
    console.print(f"  gpt2cloud status {record.run_id}     gpt2cloud logs {record.run_id} --follow")
    console.print(f"  gpt2cloud fetch {record.run_id}      gpt2cloud down {record.run_id} --graceful")
    if s.spot:  # it outlives the run, and nothing else says so
        from gpt2cloud.cli.estimate import CONTROLLER_REMOVAL

        console.print(f"  SkyPilot's jobs controller stays after the run: {CONTROLLER_REMOVAL}", soft_wrap=True)
