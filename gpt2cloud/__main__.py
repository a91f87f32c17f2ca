"""`python -m gpt2cloud` runs the command line, like the `gpt2cloud` script."""

from gpt2cloud.cli import main

main()
