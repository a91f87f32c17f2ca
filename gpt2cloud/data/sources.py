"""Documents for `gpt2cloud data prepare`, streamed one at a time from local files or the HF hub.

A source is a `.txt` file (one document), a `.jsonl` file (a `text` field per line), a `.parquet`
file (a `text` column), a directory of those (recursively, in sorted path order), or a Hugging Face
dataset `owner/name[:config]` streamed with the `datasets` library. Documents come in a fixed order,
so a rerun sees the same stream and can skip to where an interrupted run stopped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from gpt2cloud.errors import UserError

SUFFIXES = (".txt", ".jsonl", ".parquet")
HF_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
Document = tuple[str | bytes, int, tuple]  # (text or raw .jsonl line, source bytes consumed, (path, line))


@dataclass
class Source:
    spec: str  # as the user gave it
    kind: str  # "local" or "huggingface"
    files: list[Path] = field(default_factory=list)
    total_bytes: int = 0  # size of the local files (for progress/ETA); 0 when unknown

    def fingerprint(self) -> dict:
        """What identifies this source's document stream, for deciding whether a rerun may resume."""
        if self.kind == "huggingface":
            return {"kind": self.kind, "dataset": self.spec}
        root = self._root()
        return {
            "kind": self.kind,
            "files": [[_rel(p, root), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files],
        }

    def _root(self) -> Path:
        p = Path(self.spec)
        return p if p.is_dir() else p.parent

    def documents(self) -> Iterator[Document]:
        """Yield (document, source bytes consumed, (path, line)) for every document, in a fixed order.

        A document is its text, or for .jsonl the raw line (bytes): document_text() decodes it in the
        tokenizer workers, so JSON parsing does not make the parent process the bottleneck. Empty
        documents are yielded too (the tokenizer drops them) so document numbers are stable.
        """
        if self.kind == "huggingface":
            yield from _hf_documents(self.spec)
            return
        for path in self.files:
            if path.suffix == ".txt":
                yield _read_txt(path), path.stat().st_size, (path, None)
            elif path.suffix == ".jsonl":
                yield from _read_jsonl(path)
            else:
                yield from _read_parquet(path)


def _rel(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return p.as_posix()


def open_source(spec: str) -> Source:
    """Resolve SOURCE: a local file or directory if it exists, else a Hugging Face dataset id."""
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise UserError(f"{spec}: no .txt, .jsonl or .parquet files in this directory (empty source)")
        elif path.suffix in SUFFIXES:
            files = [path]
        else:
            raise UserError(f"{spec}: unsupported file type '{path.suffix}'; use .txt, .jsonl or .parquet")
        for p in files:
            if not os.access(p, os.R_OK):
                raise UserError(f"{p}: unreadable (permission denied); fix its permissions")
            if p.suffix == ".parquet":
                _parquet_file(p)  # a wrong schema is refused before --out is created
        return Source(spec, "local", files, sum(p.stat().st_size for p in files))
    if HF_PATTERN.match(spec):
        return Source(spec, "huggingface")
    raise UserError(f"{spec}: no such file or directory (nor a Hugging Face dataset id like owner/name:config)")


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: unreadable: {e.strerror}") from None


class BadDocument(ValueError):
    """A record that is not a document; args: (message, index of the record in its chunk)."""


def document_text(doc: str | bytes) -> str:
    """The text of a document as documents() yields it (a .jsonl line is parsed here)."""
    if isinstance(doc, str):
        return doc
    try:
        text = json.loads(doc)["text"]
    except (ValueError, KeyError, TypeError):
        raise BadDocument("not a JSON object with a 'text' field; every line needs {\"text\": ...}") from None
    if text is None:
        return ""  # a null text is an empty document
    if not isinstance(text, str):
        raise BadDocument(f"'text' is {type(text).__name__}, expected a string")
    return text


def _read_jsonl(path: Path) -> Iterator[Document]:
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield line, len(line), (path, lineno)
    except OSError as e:
        raise UserError(f"{path}: unreadable: {e.strerror}") from None


def _parquet_file(path: Path):
    """The opened file, its `text` column checked to hold strings (from the footer: nothing is read yet)."""
    try:
        import pyarrow.parquet as pq
        import pyarrow.types as pa_types
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types
        raise UserError(f"{path}: unreadable parquet file: {str(e).splitlines()[0]}") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    kind = pf.schema_arrow.field("text").type
    if not (pa_types.is_string(kind) or pa_types.is_large_string(kind) or pa_types.is_null(kind)):
        raise UserError(f"{path}: the 'text' column holds {kind}, not strings; write the documents' text into a "
                        "string column named 'text'")
    return pf


def _read_parquet(path: Path) -> Iterator[Document]:
    pf = _parquet_file(path)
    rows = max(pf.metadata.num_rows, 1)
    per_row = path.stat().st_size / rows  # progress in file bytes, spread evenly over rows
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
        for text in batch.column(0).to_pylist():
            row += 1
            yield text or "", int(per_row), (path, f"row {row}")


def _hf_documents(spec: str) -> Iterator[Document]:
    name, _, config = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"{spec}: streaming a Hugging Face dataset needs the `datasets` package (pip install datasets) and "
            "network access; or download its parquet files and pass their directory"
        ) from None
    try:
        ds = datasets.load_dataset(name, name=config or None, split="train", streaming=True)
        for row in ds:
            text = row.get("text")
            text = text if isinstance(text, str) else ""
            yield text, len(text.encode("utf-8")), (spec, None)
    except UserError:
        raise
    except Exception as e:  # offline, unknown dataset, gated, ...: one line, not a traceback
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise UserError(
            f"{spec}: cannot stream this Hugging Face dataset ({type(e).__name__}: {first}); check the name, "
            "the network and HF_TOKEN, or download its parquet files and pass their directory"
        ) from None
