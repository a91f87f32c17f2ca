"""Shell completion (`gpt2cloud --install-completion`): recipe names, run names and config keys.

The shell runs gpt2cloud on every Tab, so these read a directory listing and nothing more: no recipe is
parsed, no SkyPilot or torch imported, nothing asked of the network. They never raise: a completion that
fails returns [] and the shell falls back to completing file names (bash `-o default`, zsh `_files`),
which is also how a recipe YAML in another directory is reached.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

MAX_ENTRIES = 2000  # entries looked at in one directory: a huge one must not make Tab hang


def recipes(incomplete: str) -> list[str]:
    """The bundled recipe names, and *.yaml files beside what was typed (recipes/my.yaml, ./x.yaml)."""
    try:
        return [n for n in _bundled_recipes() if n.startswith(incomplete)] + _yaml_files(incomplete)
    except Exception:  # noqa: BLE001 - completion must never break the shell's Tab
        return []


def runs(incomplete: str) -> list[str]:
    """Run ids in the registry ($GPT2CLOUD_HOME/runs/RUN.json), read as file names only."""
    try:
        from gpt2cloud import home

        # RUN.json; lock files (.RUN.lock) and a write's temporary files (.RUN.json.tmp...) start with "."
        files = itertools.islice(home.runs_dir().iterdir(), MAX_ENTRIES)
        names = (p.name[: -len(".json")] for p in files if p.name.endswith(".json") and not p.name.startswith("."))
        return sorted(n for n in names if n.startswith(incomplete))
    except Exception:  # noqa: BLE001 - no registry yet, unreadable: nothing to offer
        return []


def config_keys(incomplete: str) -> list[str]:
    try:
        from gpt2cloud.settings import KEYS

        return [k for k in KEYS if k.startswith(incomplete)]
    except Exception:  # noqa: BLE001
        return []


def _bundled_recipes() -> list[str]:
    # the directory gpt2cloud.cost.recipes.known_recipes() lists, without importing pydantic for it
    import importlib.resources

    files = importlib.resources.files("gpt2cloud.recipe_files").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def _yaml_files(incomplete: str) -> list[str]:
    head = incomplete[: incomplete.rfind("/") + 1]  # "", "dir/" or "/": the folder part, as typed
    folder = Path(os.path.expanduser(head or "."))
    out = []
    for p in itertools.islice(folder.iterdir(), MAX_ENTRIES):
        name = head + p.name
        hidden = p.name.startswith(".") and not incomplete[len(head):].startswith(".")
        if name.startswith(incomplete) and p.name.endswith((".yaml", ".yml")) and not hidden and p.is_file():
            out.append(name)
    return sorted(out)
