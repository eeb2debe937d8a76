"""Read documents from text, jsonl and parquet inputs; count what had to be skipped.

Inputs are files, directories (searched recursively for the known suffixes), glob patterns,
or ``-`` for stdin (jsonl when its first non-empty line starts with ``{``, else text).
Formats by suffix, optionally compressed (``.gz``, ``.bz2``, ``.xz``):

- ``.txt``/``.text``: split by ``sample_by``: ``"document"`` (the whole file is one document),
  ``"paragraph"`` (blank lines separate documents) or ``"line"`` (one document per line);
- ``.jsonl``/``.json``: one JSON object per line, the document under ``text_key``;
- ``.parquet``: the ``text_key`` column.

A line that is empty (jsonl, or text read by line), not UTF-8, not a JSON object or lacks a
string ``text_key`` is skipped and counted in :class:`ReadStats` (with a few examples for the
warning) — a bad line never aborts a long run, and never reaches a row.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_MAX_EXAMPLES = 5


@dataclass
class ReadStats:
    """Counts of what was read and skipped (and why), merged over workers and inputs."""

    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: ReadStats) -> None:
        self.documents += other.documents
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.examples.extend(other.examples[: max(0, _MAX_EXAMPLES - len(self.examples))])

    def warning(self) -> str | None:
        if not self.num_skipped:
            return None
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"skipped {self.num_skipped} input lines ({reasons}); e.g. " + "; ".join(self.examples)


def _kind(path: str) -> str | None:
    name = path.lower()
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, directories and globs -> a sorted, de-duplicated file list (``-`` kept as is).

    A path that matches nothing raises ``FileNotFoundError`` naming it: a typo must not
    produce a silently smaller dataset.
    """
    if not inputs:
        raise ValueError("no inputs given; pass files, directories, globs or '-' for stdin")
    files: list[str] = []
    for item in inputs:
        if item == "-":
            files.append("-")
            continue
        if os.path.isdir(item):
            found = sorted(
                str(p) for p in Path(item).rglob("*") if p.is_file() and _kind(str(p)) is not None
            )
            if not found:
                raise FileNotFoundError(
                    f"input directory {item!r} holds no .txt/.jsonl/.parquet files (optionally .gz/.bz2/.xz)"
                )
            files.extend(found)
        elif os.path.isfile(item):
            if _kind(item) is None:
                raise ValueError(f"input {item!r} has an unknown suffix; use .txt, .jsonl or .parquet")
            files.append(item)
        else:
            matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"input {item!r} does not exist (no file, directory or glob match)")
            files.extend(m for m in matches if _kind(m) is not None)
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _open_binary(path: str) -> IO[bytes]:
    if path == "-":
        return sys.stdin.buffer
    lower = path.lower()
    for suffix, opener in _COMPRESSED.items():
        if lower.endswith(suffix):
            return opener(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _line_document(raw: bytes, kind: str, text_key: str, where: str, stats: ReadStats) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("non-UTF-8", where)
        return None
    line = line.rstrip("\r\n")
    if kind == "jsonl":
        if not line.strip():
            stats.skip("empty", where)
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            stats.skip("malformed JSON", where)
            return None
        if not isinstance(obj, dict):
            stats.skip("not a JSON object", where)
            return None
        if not isinstance(obj.get(text_key), str):
            stats.skip(f"no string {text_key!r} field", where)
            return None
        line = obj[text_key]
    if not line.strip():
        stats.skip("empty", where)
        return None
    return line


SAMPLE_BY = ("document", "paragraph", "line")


def _iter_text_blocks(path: str, sample_by: str, stats: ReadStats) -> Iterator[str]:
    """A text file as one document, or one per paragraph (blank-line separated)."""
    fh = _open_binary(path)
    try:
        raw = fh.read()
    finally:
        if path != "-":
            fh.close()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        stats.skip("non-UTF-8", f"{path}:byte {err.start}")
        return
    text = text.replace("\r\n", "\n")
    blocks = [text] if sample_by == "document" else re.split(r"\n[ \t]*\n", text)
    for block in blocks:
        block = block.strip("\n")
        if not block.strip():
            # Blank runs between paragraphs are separators, not damaged input; only an empty file counts.
            if sample_by == "document":
                stats.skip("empty", path)
            continue
        stats.documents += 1
        yield block


def iter_documents(
    files: Sequence[str], *, text_key: str = "text", stats: ReadStats, sample_by: str = "line"
) -> Iterator[str]:
    """Yield every document of ``files`` (already expanded) in order, counting skips in ``stats``.

    ``sample_by`` applies to text inputs only (see the module doc); jsonl and parquet hold one
    document per record.
    """
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"sample_by={sample_by!r}; choose one of {', '.join(SAMPLE_BY)}")
    for path in files:
        kind = "auto" if path == "-" else _kind(path)
        if kind == "parquet":
            yield from _iter_parquet(path, text_key, stats)
            continue
        if kind == "text" and sample_by != "line":
            yield from _iter_text_blocks(path, sample_by, stats)
            continue
        fh = _open_binary(path)
        try:
            for lineno, raw in enumerate(fh, start=1):
                if kind == "auto" and raw.strip():
                    # One format for the whole stream: a bad line must be counted, not re-typed.
                    kind = "jsonl" if raw.lstrip().startswith(b"{") else "text"
                doc = _line_document(raw, kind or "text", text_key, f"{path}:{lineno}", stats)
                if doc is not None:
                    stats.documents += 1
                    yield doc
        finally:
            if path != "-":
                fh.close()


def _iter_parquet(path: str, text_key: str, stats: ReadStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise ValueError(
            f"parquet file {path} has no column {text_key!r} (columns: {pf.schema_arrow.names}); "
            "pass --text-key"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str) or not value.strip():
                stats.skip("empty", f"{path}:row {row}")
                continue
            stats.documents += 1
            yield value
