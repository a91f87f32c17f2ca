"""gpt2cloud: from "what will GPT-2 cost me?" to a trained checkpoint you can talk to.

Kept free of imports: `model/` on a GPU node imports `gpt2cloud.store` without typer or pydantic.
"""

__version__ = "0.1.0"
