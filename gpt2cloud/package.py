"""Ship this exact version of the trainer to a node: a pure-Python wheel of `gpt2cloud` + `model`.

Built from the modules this process imports (editable checkout or installed package alike), with no
build backend and no network, byte-for-byte reproducible (sorted entries, fixed timestamps). The node
installs it with `pip install --no-deps`, so skypilot, typer and pydantic never land on a GPU node.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import io
import zipfile
from pathlib import Path

import gpt2cloud

NAME = "gpt2cloud"
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".tmp")
# What the node needs besides the wheel and torch (skypilot is deliberately absent): the node's setup
# (gpt2cloud/tasks.py) installs exactly these.
NODE_REQUIREMENTS = ("numpy", "tiktoken", "safetensors", "boto3")


def _files_of(package: str, arc_prefix: str) -> list[tuple[str, bytes]]:
    root = Path(str(importlib.resources.files(package)))
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if not p.is_file() or any(part in SKIP_DIRS for part in rel.parts) or p.name.endswith(SKIP_SUFFIXES):
            continue
        out.append((f"{arc_prefix}/{rel.as_posix()}", p.read_bytes()))
    return out


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def wheel_bytes() -> tuple[str, bytes]:
    """(file name, wheel content) for the code this process runs."""
    version = gpt2cloud.__version__
    files = _files_of("gpt2cloud", "gpt2cloud") + _files_of("model", "model")
    # Recipes live in recipes/ in the checkout and are installed as gpt2cloud.recipe_files.
    files = [f for f in files if not f[0].startswith("gpt2cloud/recipe_files/")]
    files += _files_of("gpt2cloud.recipe_files", "gpt2cloud/recipe_files")
    dist_info = f"{NAME}-{version}.dist-info"
    metadata = (
        "Metadata-Version: 2.1\n"
        f"Name: {NAME}\nVersion: {version}\n"
        "Summary: gpt2cloud trainer, shipped to a node by `gpt2cloud launch`\n"
        + "".join(f"Requires-Dist: {r}\n" for r in ("torch", *NODE_REQUIREMENTS))
    ).encode()
    wheel = b"Wheel-Version: 1.0\nGenerator: gpt2cloud\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    files += [
        (f"{dist_info}/METADATA", metadata),
        (f"{dist_info}/WHEEL", wheel),
        (f"{dist_info}/top_level.txt", b"gpt2cloud\nmodel\n"),
    ]
    record_name = f"{dist_info}/RECORD"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files) + f"{record_name},,\n"
    files.append((record_name, record.encode()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return f"{NAME}-{version}-py3-none-any.whl", buf.getvalue()


def build_wheel(dest_dir: str | Path) -> tuple[Path, str]:
    """Write the wheel into dest_dir (replacing older ones); return (path, sha256 hex)."""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    name, data = wheel_bytes()
    for old in dest.glob(f"{NAME}-*.whl"):
        old.unlink()
    path = dest / name
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()
