"""Text to GPT-2 token shards: where documents come from (sources.py) and the tokenizing pool (prepare.py)."""
