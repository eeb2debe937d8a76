"""A few MB of real English, built at run time from documentation installed on this machine.

Nothing third-party is shipped with ssa-megatron: the demo corpus is assembled on the spot
from the docstrings (triple-quoted strings) of installed Python packages (``site-packages`` of the running
interpreter and the standard library). Prose is kept, code and tables are dropped:

- each docstring is split into paragraphs; a paragraph is kept when it reads like English
  sentences (mostly letters, enough common English function words, no doctest/code lines,
  a sentence end);
- paragraphs are de-duplicated by a hash of their normalised text (many packages vendor
  the same code);
- files are visited in sorted order and each top-level package contributes at most
  ``max_share`` of the target, so the corpus is deterministic for a given set of installed
  packages and not dominated by the largest one.

:func:`prepare_demo_dataset` goes on to train a small sentencepiece tokenizer and write the
train/val MDS shards, caching everything under a directory keyed by its parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_CODEY = re.compile(r"(>>>|\.\.\. |::|\{|\}|==|->|\w+\(.*\)|^\s*[-=~^*#]{3,}\s*$|https?://|`)", re.M)
# "Args: ...", "Returns: ...": parameter lists flattened into one line, not prose.
_SECTION_HEADER = re.compile(r"^[A-Z][A-Za-z ]{0,24}:")
_FUNCTION_WORDS = frozenset({
    "the", "a", "an", "of", "to", "in", "and", "or", "is", "are", "was", "be", "been", "it", "this",
    "that", "these", "those", "for", "on", "with", "as", "by", "from", "at", "not", "no", "can",
    "will", "may", "should", "would", "if", "when", "which", "who", "what", "how", "than", "then",
    "there", "their", "its", "into", "also", "only", "such", "each", "all", "any", "more", "most",
    "other", "some", "use", "used", "using", "we", "you", "they", "he", "she", "one",
})
_SKIP_DIRS = ("site-packages", "test", "tests", "__pycache__")
_TRIPLE_QUOTED = re.compile(r'(?s)("""|\'\'\')(.*?)\1')
_MAX_FILE_BYTES = 400_000
CORPUS_VERSION = 1


@dataclass(frozen=True)
class CorpusStats:
    documents: int
    bytes: int
    files_scanned: int
    packages: int
    seconds: float


def _doc_paragraphs(doc: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", doc):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if lines:
            yield " ".join(lines)


def is_english_prose(paragraph: str) -> bool:
    """Heuristic: sentences of common English words, not code, tables or lists of names."""
    if len(paragraph) < 80 or len(paragraph) > 4000:
        return False
    if _CODEY.search(paragraph) or _SECTION_HEADER.match(paragraph):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
    if letters / len(paragraph) < 0.88 or not paragraph.isascii():
        return False
    words = _WORD.findall(paragraph)
    if len(words) < 14:
        return False
    function_share = sum(w.lower() in _FUNCTION_WORDS for w in words) / len(words)
    if function_share < 0.22:
        return False
    return paragraph.rstrip().endswith((".", "?", "!")) and paragraph[0].isupper()


def _docstrings(path: Path) -> Iterator[str]:
    """Triple-quoted strings of a source file (a regex, not ast: ~20x faster, and the prose
    filter drops the few that are not documentation)."""
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            return
        source = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return
    for match in _TRIPLE_QUOTED.finditer(source):
        yield match.group(2)


def _package_roots() -> list[tuple[str, Path]]:
    """(name, directory) of every installed top-level package, plus the standard library."""
    roots: dict[str, Path] = {}
    paths = sysconfig.get_paths()
    for base in sorted({paths["purelib"], paths["platlib"]}):
        base_path = Path(base)
        if not base_path.is_dir():
            continue
        for child in sorted(base_path.iterdir()):
            if child.is_dir() and child.name.isidentifier() and not child.name.startswith("_"):
                roots.setdefault(child.name, child)
    stdlib = Path(paths["stdlib"])
    if stdlib.is_dir():
        roots.setdefault("python-stdlib", stdlib)
    return sorted(roots.items())


def _py_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted in place so os.walk visits directories in a fixed order.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def build_demo_corpus(
    out_path: str | os.PathLike, *, target_bytes: int = 3_000_000, max_share: float = 0.08
) -> CorpusStats:
    """Write ``out_path`` (jsonl, ``{"text": ...}`` per docstring) with about ``target_bytes`` of prose."""
    start = time.perf_counter()
    per_package = max(1, int(target_bytes * max_share))
    seen: set[bytes] = set()
    written = documents = files = packages = 0
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for _name, root in _package_roots():
            if written >= target_bytes:
                break
            taken = 0
            for path in _py_files(root):
                if taken >= per_package or written >= target_bytes:
                    break
                files += 1
                for doc in _docstrings(path):
                    kept = []
                    for para in _doc_paragraphs(doc):
                        if not is_english_prose(para):
                            continue
                        norm = " ".join(para.lower().split())
                        key = hashlib.blake2b(norm.encode(), digest_size=16).digest()
                        if key in seen:
                            continue
                        seen.add(key)
                        kept.append(para)
                    if kept:
                        text = "\n\n".join(kept)
                        fh.write(json.dumps({"text": text}) + "\n")
                        documents += 1
                        taken += len(text)
                        written += len(text)
            packages += taken > 0
    os.replace(tmp, out)
    if written < target_bytes // 10:
        raise RuntimeError(
            f"only {written} bytes of English docstrings were found under {sys.prefix}; the demo corpus "
            f"needs ~{target_bytes}. Use your own text with tools/prepare_data.py instead."
        )
    return CorpusStats(documents, written, files, packages, time.perf_counter() - start)


class DemoDataExists(FileExistsError):
    """The demo directory holds a set built with other parameters (or foreign files); nothing was changed."""


@dataclass(frozen=True)
class DemoDataset:
    root: Path
    train: Path  # MDS split directories
    valid: Path
    tokenizer: Path  # sentencepiece model
    built: bool  # False when everything was already there with the same parameters


_MANIFEST = "demo.json"


@dataclass(frozen=True)
class DemoParams:
    """What a demo set is built from; ``demo.json`` records it, and a set is reused only when it matches."""

    seq_len: int
    vocab_size: int = 4096
    # Corpus size in bytes of text.
    target_bytes: int = 3_000_000
    valid_fraction: float = 0.05
    seed: int = 1234
    # sentencepiece model type.
    model_type: str = "bpe"

    def manifest(self) -> dict:
        return {"version": CORPUS_VERSION, **dataclasses.asdict(self)}


def check_demo_dataset(
    out_dir: str | os.PathLike, seq_len: int, vocab_size: int = 4096, **options: Any
) -> bool:
    """True when ``out_dir`` holds the demo set of these parameters, False when it is empty or absent
    (to be built); raises :class:`DemoDataExists` (one line, nothing touched) for anything else.
    ``options``: the other fields of :class:`DemoParams` by keyword (target_bytes, valid_fraction, seed,
    model_type). Reads only, so every rank can call it before one of them builds."""
    root = Path(out_dir)
    params = DemoParams(seq_len, vocab_size, **options).manifest()
    manifest = root / _MANIFEST
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text()).get("params")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded == params:
            return True
        # Rebuilding in place would change the shards (and tokenizer) under checkpoints trained on them.
        if isinstance(recorded, dict):
            changed = ", ".join(f"{k}={recorded.get(k)!r} (asked: {v!r})" for k, v in params.items()
                                if recorded.get(k) != v)
        else:
            changed = f"an unreadable {_MANIFEST}"
        raise DemoDataExists(
            f"{root} already holds demo data built with other parameters ({changed}); demo data is never "
            "rebuilt in place: point data.path at a new directory for these parameters"
        )
    elif root.is_dir() and any(root.iterdir()):
        raise DemoDataExists(
            f"{root} is not empty and was not built by prepare_demo_dataset (no {_MANIFEST}); "
            "pick an empty or new directory for the demo data"
        )
    return False


def prepare_demo_dataset(
    out_dir: str | os.PathLike,
    seq_len: int,
    vocab_size: int = 4096,
    *,
    workers: int = 1,
    progress: bool = False,
    **options: Any,
) -> DemoDataset:
    """Corpus -> sentencepiece tokenizer -> ``out_dir/train`` and ``out_dir/val`` MDS shards.

    ``options``: the other fields of :class:`DemoParams` by keyword (target_bytes, valid_fraction, seed,
    model_type).

    Writes into ``out_dir``: ``corpus.jsonl``, ``tokenizer.model``/``.vocab``, ``train/``,
    ``val/`` and ``demo.json`` (the parameters, written last). When ``demo.json`` already
    records the same parameters nothing is rebuilt; with other parameters the directory is
    refused (:class:`DemoDataExists`): shards and tokenizer are never rebuilt under checkpoints
    trained on them. A non-empty ``out_dir`` without ``demo.json`` is refused rather than
    overwritten. Run it on one process per filesystem (e.g. global rank 0, then a barrier).
    """
    from ssa_megatron.data.prepare import TRAIN_SPLIT, VALID_SPLIT, prepare_dataset
    from ssa_megatron.data.readers import ReadStats, iter_documents
    from ssa_megatron.data.tokenizer import train_sentencepiece

    root = Path(out_dir)
    demo = DemoParams(seq_len, vocab_size, **options)
    params = demo.manifest()
    result = DemoDataset(root, root / TRAIN_SPLIT, root / VALID_SPLIT, root / "tokenizer.model", built=False)
    if check_demo_dataset(root, **dataclasses.asdict(demo)):
        return result
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / _MANIFEST
    corpus = root / "corpus.jsonl"
    corpus_stats = build_demo_corpus(corpus, target_bytes=demo.target_bytes)
    docs = iter_documents([str(corpus)], stats=ReadStats())
    train_sentencepiece(docs, root / "tokenizer", vocab_size=vocab_size, model_type=demo.model_type,
                        seed=demo.seed, num_threads=max(1, workers))
    summary = prepare_dataset(
        [str(corpus)], root, result.tokenizer, seq_len, valid_fraction=demo.valid_fraction, seed=demo.seed,
        workers=workers, overwrite=True, progress=progress,
    )
    manifest.write_text(json.dumps({
        "params": params, "corpus": corpus_stats.__dict__, "shards": summary.to_dict(),
    }, indent=2))
    return DemoDataset(result.root, result.train, result.valid, result.tokenizer, built=True)
