"""The `gpt2cloud` command: one Typer app; each command lives in its own module beside this one.

Command modules import torch, skypilot or boto3 only inside their functions, so `--help` and
`estimate` never pay for them.
"""

from __future__ import annotations

import typer
from typer import _click
from typer.core import TyperGroup

from gpt2cloud.cli.output import fail, handles_errors


class OneLineErrors(TyperGroup):
    """Usage errors (a missing argument, a bad option value, an unknown command) as one line with the
    fix and exit code 2, like every other error, instead of Typer's multi-line box."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _click.exceptions.UsageError as e:
            usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _click.exceptions.UsageError as e:
            usage_error(e)


def usage_error(e) -> None:
    where = e.ctx.command_path if e.ctx else "gpt2cloud"
    message = " ".join(e.format_message().split()).rstrip(".")
    fail(f"{message.replace('[', chr(92) + '[')}; see `{where} --help`")


app = typer.Typer(
    cls=OneLineErrors,
    name="gpt2cloud",
    help="Train GPT-2 on rented cloud GPUs: estimate the cost, prepare data, launch, watch, fetch, sample.",
    no_args_is_help=True,  # --install-completion / --show-completion: gpt2cloud/cli/completion.py
    pretty_exceptions_enable=False,
)


def register(typer_app: typer.Typer, name: str, fn) -> None:
    typer_app.command(name)(handles_errors(fn))


def _version(value: bool):
    if value:
        from gpt2cloud import __version__

        typer.echo(f"gpt2cloud {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


# ---- commands, one module each, in the order of the flow (and of `--help`) ----
from gpt2cloud.cli import config, data, down, estimate, export, fetch, launch, logs  # noqa: E402
from gpt2cloud.cli import eval as evaluate  # noqa: E402  (not shadowing the builtin)
from gpt2cloud.cli import plot, report, runs, sample, status, train  # noqa: E402

register(app, "estimate", estimate.estimate_command)
data_app = typer.Typer(cls=OneLineErrors, help="Prepare token shards and move them to and from object storage.",
                       no_args_is_help=True)
register(data_app, "prepare", data.prepare_command)
register(data_app, "upload", data.upload_command)
register(data_app, "download", data.download_command)
app.add_typer(data_app, name="data")
register(app, "train", train.train_command)
register(app, "sample", sample.sample_command)
register(app, "launch", launch.launch_command)
register(app, "status", status.status_command)
register(app, "logs", logs.logs_command)
register(app, "fetch", fetch.fetch_command)
register(app, "down", down.down_command)
register(app, "runs", runs.runs_command)
register(app, "eval", evaluate.eval_command)
register(app, "plot", plot.plot_command)
register(app, "report", report.report_command)
register(app, "export", export.export_command)
config_app = typer.Typer(cls=OneLineErrors, help="Defaults for `launch` (bucket, infra, gpus, ...) where a flag is "
                         "not given: $GPT2CLOUD_HOME/config.toml.", no_args_is_help=True)
# a value may start with "-" (a negative --max-cost): read it as the value, and let the rule say what is wrong
config_app.command("set", context_settings={"ignore_unknown_options": True})(handles_errors(config.set_command))
register(config_app, "get", config.get_command)
register(config_app, "show", config.show_command)
register(config_app, "unset", config.unset_command)
app.add_typer(config_app, name="config")


def main():
    app()

