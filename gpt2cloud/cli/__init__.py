"""The `gpt2cloud` command line: the Typer app (app.py), how commands print (output.py), and one module
per command that parses its options, calls one function and prints the result.

Command modules import torch, skypilot or boto3 only inside their functions, so `--help` and
`estimate` never pay for them.
"""

from gpt2cloud.cli.app import app, main

__all__ = ["app", "main"]
