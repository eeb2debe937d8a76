#!/usr/bin/env python3
"""Build the reproduction corpus from English documentation installed on this machine.

Nothing is downloaded. Two sources, both read at run time and never shipped with ssa-megatron:

- ``python``: docstrings of every installed Python package and of the standard library
  (licences: each package's own, mostly BSD/MIT/Apache/PSF; see its dist-info metadata);
- ``debian``: Debian documentation packages: ``/usr/share/doc`` (README, text, Markdown,
  reStructuredText and HTML files, gzipped or not; changelogs and copyright files skipped),
  GNU info manuals in ``/usr/share/info`` and English manual pages in ``/usr/share/man``
  (licences: each package's ``/usr/share/doc/<package>/copyright``; GPL/GFDL/BSD mostly).

The Linux kernel's documentation is never read (it is kept aside for independent checks).
Prose is kept paragraph by paragraph (the same English filter as the demo corpus: sentences of
common English words, no code), de-duplicated, and written as one document per ``--document-unit``:
``file`` (default) makes a document of a Python module's docstrings in order, of a documentation
file, of a man page, and of a whole info manual (its numbered parts together); ``docstring`` (the
first corpus version) makes one of each docstring and of each info part. Documents then go to
``train`` or ``val`` by a seeded hash of their index. The tool trains
a sentencepiece tokenizer on the corpus, writes MDS shards, and prints the corpus size, its
SHA-256 and the token counts::

    python tools/build_corpus.py --output data/repro --seq-len 2048 --vocab-size 8192

Writes ``corpus.jsonl``, ``sources.json`` (bytes per source package), ``tokenizer.model``,
``train/``, ``val/`` and ``corpus_manifest.json`` (parameters, hash, counts; written last).
Re-running with the same parameters on the same machine does nothing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from itertools import groupby
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ssa_megatron.data.demo_corpus import (  # noqa: E402
    _doc_paragraphs,
    _docstrings,
    _package_roots,
    _py_files,
    is_english_prose,
)

CORPUS_VERSION = 2
SOURCES = ("python", "debian")
# What one document is (see the module docstring): whole files keep a text's long-range context,
# which is what the sparse and full attention modes differ on.
DOCUMENT_UNITS = ("file", "docstring")
DEBIAN_ROOTS = ("/usr/share/doc", "/usr/share/info", "/usr/share/man")
MANIFEST = "corpus_manifest.json"
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".html", ".htm", ".text", ".info")
_SKIP_NAMES = re.compile(r"^(changelog|copyright|changes|news\.debian|authors|thanks)", re.I)
# Kernel documentation (linux-doc and friends) stays out of the corpus whatever the root.
_KERNEL = re.compile(r"(^|/)(linux-doc[^/]*|linux-source[^/]*|linux-headers[^/]*|kernel-doc[^/]*)(/|$)")
_TAG = re.compile(r"(?s)<(script|style)\b.*?</\1>|<[^>]+>")
_MAX_DOC_FILE = 4_000_000
_TROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\\*.|\\&|\\-")


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_DOC_FILE:
            return None
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def _troff_to_text(source: str) -> str:
    """Man-page source -> plain paragraphs: requests dropped, font escapes removed, `.PP`/`.SH`
    (and friends) start new paragraphs."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            if re.match(r"^[.'](PP|P|LP|SH|SS|TP|IP|HP|sp|br|RS|RE)\b", line):
                out.append("")
            continue
        line = _TROFF_ESCAPE.sub(lambda m: "-" if m.group() == "\\-" else "", line)
        out.append(line.replace("\\e", "\\"))
    return "\n".join(out)


def _html_to_text(source: str) -> str:
    source = re.sub(r"(?i)</?(p|div|h\d|li|br|pre|table|tr|section|dt|dd)\b[^>]*>", "\n\n", source)
    return html.unescape(_TAG.sub(" ", source))


def _debian_files(roots: list[Path]) -> Iterator[tuple[str, Path, str]]:
    """(package or manual name, path, format) of every documentation file under ``roots``, sorted."""
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            parts = [] if rel_dir == "." else rel_dir.split(os.sep)
            if root.name == "man" and parts and not parts[0].startswith("man"):
                dirnames[:] = []  # localized manual pages (de/, fr/, ...): not English
                continue
            dirnames[:] = sorted(d for d in dirnames if not _KERNEL.search(d + "/"))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if _KERNEL.search(str(path)) or _SKIP_NAMES.match(name):
                    continue
                stem = name[:-3] if name.endswith(".gz") else name
                is_man = root.name == "man"
                if not (
                    is_man
                    or stem.lower().endswith(_TEXT_SUFFIXES)
                    or re.search(r"\.info(-\d+)?$", stem)
                    or stem.upper().startswith("README")
                ):
                    continue
                package = parts[0] if parts and not is_man else stem.split(".")[0]
                kind = "man" if is_man else "html" if stem.lower().endswith((".html", ".htm")) else "text"
                yield f"{root.name}/{package}", path, kind


def _debian_text(path: Path, kind: str) -> str | None:
    text = _read_text(path)
    convert = {"man": _troff_to_text, "html": _html_to_text}.get(kind)
    return convert(text) if convert and text is not None else text


def _info_part(path: Path) -> int:
    """The part number of an info file (``name.info-3.gz`` -> 3; ``name.info`` and other files -> 0)."""
    match = re.search(r"\.info-(\d+)(\.gz)?$", path.name)
    return int(match.group(1)) if match else 0


def _debian_documents(roots: list[Path], unit: str) -> Iterator[tuple[str, str]]:
    """(origin, text) per document; with unit ``file`` an info manual's parts (``name.info``,
    ``name.info-1``, ... : the files of one origin under ``info/``, listed consecutively) are one."""

    def document_of(entry: tuple[str, Path, str]) -> object:
        origin, path, _kind = entry
        return origin if unit == "file" and origin.startswith("info/") else path

    for _key, group in groupby(_debian_files(roots), key=document_of):
        # Parts in reading order: name.info, then name.info-1, -2, ..., -10 (not the names' order).
        files = sorted(group, key=lambda e: _info_part(e[1]))
        texts = [text for _origin, path, kind in files if (text := _debian_text(path, kind)) is not None]
        if texts:
            yield files[0][0], "\n\n".join(texts)


def _python_documents(
    unit: str, roots: Sequence[tuple[str, Path]] | None = None
) -> Iterator[tuple[str, str]]:
    """(origin, text) per module (unit ``file``: its docstrings in order) or per docstring."""
    for name, root in _package_roots() if roots is None else roots:
        for path in _py_files(root):
            docs = list(_docstrings(path))
            if unit == "file" and docs:
                yield f"python/{name}", "\n\n".join(docs)
            elif unit == "docstring":
                yield from ((f"python/{name}", doc) for doc in docs)


def build_corpus(
    out_path: Path, sources: list[str], *, max_bytes: int, max_source_bytes: int, debian_roots: list[Path],
    document_unit: str = "file",
) -> dict:  # fmt: skip
    """Write ``out_path`` (jsonl, ``{"text", "source"}``); returns statistics and bytes per source.

    A source (package or manual) contributes at most ``max_source_bytes``: generated API
    documentation (cloud SDKs) would otherwise be a third of the text, in a few templates."""
    start = time.perf_counter()
    seen: set[bytes] = set()
    per_source: Counter[str] = Counter()
    written = documents = 0
    tmp = out_path.with_name(out_path.name + ".tmp")
    generators = {
        "python": lambda: _python_documents(document_unit),
        "debian": lambda: _debian_documents(debian_roots, document_unit),
    }
    with tmp.open("w", encoding="utf-8") as fh:
        for source in sources:
            for origin, raw in generators[source]():
                if written >= max_bytes:
                    break
                if per_source[origin] >= max_source_bytes:
                    continue
                kept = []
                for para in _doc_paragraphs(raw):
                    if not is_english_prose(para):
                        continue
                    key = hashlib.blake2b(" ".join(para.lower().split()).encode(), digest_size=16).digest()
                    if key not in seen:
                        seen.add(key)
                        kept.append(para)
                if kept:
                    text = "\n\n".join(kept)
                    fh.write(json.dumps({"text": text, "source": origin}) + "\n")
                    documents += 1
                    written += len(text)
                    per_source[origin] += len(text)
    os.replace(tmp, out_path)
    return {
        "documents": documents,
        "bytes": written,
        "seconds": round(time.perf_counter() - start, 1),
        "per_source": dict(sorted(per_source.items(), key=lambda kv: -kv[1])),
    }


# Document positions at which the corpus's long-range context is counted (tokens): the S and M
# recipes' sparse receptive fields (8 x 16 and 16 x 16 blocks), and longer spans.
CONTEXT_CUTOFFS = (128, 256, 1024, 4096)


def context_shares(lengths: Sequence[int], cutoffs: Sequence[int] = CONTEXT_CUTOFFS) -> dict[str, float]:
    """Share of all tokens that sit at document position >= each cutoff, i.e. whose own document
    holds more context before them than a window of that many tokens sees."""
    total = sum(lengths) or 1
    return {str(c): round(sum(max(0, n - c) for n in lengths) / total, 4) for c in cutoffs}


def document_token_lengths(corpus: Path, tokenizer_model: Path) -> list[int]:
    """Tokens per document of ``corpus`` (its EOS included), as the shards will hold them."""
    from ssa_megatron.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_model)
    with corpus.open(encoding="utf-8") as fh:
        return [len(tokenizer.encode(json.loads(line)["text"])) + 1 for line in fh]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", help=f"dataset directory (new, empty, or holding a {MANIFEST})")
    p.add_argument("--sources", default="python,debian", help="comma list of python,debian")
    p.add_argument("--debian-roots", default=",".join(DEBIAN_ROOTS), help="comma list of documentation roots")
    p.add_argument("--max-megabytes", type=float, default=400.0, help="stop collecting after this much text")
    p.add_argument(
        "--max-source-megabytes",
        type=float,
        default=1.0,
        help="cap per package or manual (default: %(default)s)",
    )
    p.add_argument("--document-unit", choices=DOCUMENT_UNITS, default="file",
                   help="what one document is (default: %(default)s; docstring: the first corpus version)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--valid-fraction", type=float, default=0.02, help="share of documents held out")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 1))))
    p.add_argument("--corpus-only", action="store_true", help="write corpus.jsonl and sources.json only")
    p.add_argument("--min-megabytes", type=float, default=1.0, help="refuse a corpus smaller than this")
    args = p.parse_args(argv)
    if not args.output:
        p.error("--output is required")
    args.sources = [s for s in args.sources.split(",") if s]
    bad = [s for s in args.sources if s not in SOURCES]
    if bad or not args.sources:
        p.error(f"--sources {','.join(bad) or '(empty)'}: choose from {','.join(SOURCES)}")
    if args.max_megabytes <= 0 or args.max_source_megabytes <= 0:
        p.error(
            f"--max-megabytes {args.max_megabytes} / --max-source-megabytes {args.max_source_megabytes}: "
            "must be positive"
        )
    if not 0.0 < args.valid_fraction < 0.5:
        p.error(f"--valid-fraction {args.valid_fraction} must lie in (0, 0.5)")
    if args.seq_len < 16 or args.vocab_size < 300:
        p.error(f"--seq-len {args.seq_len} / --vocab-size {args.vocab_size}: need >= 16 and >= 300")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.output)
    params = {
        "version": CORPUS_VERSION,
        "sources": args.sources,
        "max_bytes": int(args.max_megabytes * 1e6),
        "max_source_bytes": int(args.max_source_megabytes * 1e6),
        "debian_roots": args.debian_roots,
        "document_unit": args.document_unit,
        "seq_len": args.seq_len,
        "vocab_size": args.vocab_size,
        "valid_fraction": args.valid_fraction,
        "seed": args.seed,
        "corpus_only": args.corpus_only,
    }
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == params and manifest.get("complete"):
            print(f"{out} already built: {manifest['corpus']['bytes']} bytes, sha256 {manifest['sha256']}")
            return 0
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(
            f"error: --output {out} exists and holds no {MANIFEST}; pick a new or empty directory",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    # Written first, so an interrupted build is recognised as ours and rebuilt by the next call.
    manifest_path.write_text(json.dumps({"params": params, "complete": False}) + "\n")
    corpus = out / "corpus.jsonl"
    roots = [Path(r) for r in args.debian_roots.split(",") if r]
    stats = build_corpus(
        corpus,
        args.sources,
        max_bytes=params["max_bytes"],
        max_source_bytes=params["max_source_bytes"],
        debian_roots=roots,
        document_unit=args.document_unit,
    )
    per_source = stats.pop("per_source")
    (out / "sources.json").write_text(json.dumps(per_source, indent=1) + "\n")
    if stats["bytes"] < args.min_megabytes * 1e6:
        print(
            f"error: only {stats['bytes']} bytes of English prose found in --sources "
            f"{','.join(args.sources)}; install documentation packages or add sources",
            file=sys.stderr,
        )
        return 1
    digest = sha256_file(corpus)
    by_kind = Counter(origin.split("/")[0] for origin in per_source)
    print(
        f"corpus {corpus}: {stats['documents']} documents, {stats['bytes'] / 1e6:.1f} MB from "
        f"{dict(by_kind)} sources in {stats['seconds']} s; sha256 {digest}"
    )
    manifest = {"params": params, "complete": False, "corpus": stats, "sha256": digest}
    if not args.corpus_only:
        from ssa_megatron.data.prepare import prepare_dataset
        from ssa_megatron.data.readers import ReadStats, iter_documents
        from ssa_megatron.data.tokenizer import train_sentencepiece

        train_sentencepiece(
            iter_documents([str(corpus)], stats=ReadStats()),
            out / "tokenizer",
            vocab_size=args.vocab_size,
            seed=args.seed,
            num_threads=args.workers,
            input_sentence_size=2_000_000,
        )
        summary = prepare_dataset(
            [str(corpus)],
            out,
            out / "tokenizer.model",
            args.seq_len,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
            workers=args.workers,
            overwrite=True,
            progress=False,
        )
        manifest["shards"] = summary.to_dict()
        splits = {k: v["tokens"] for k, v in manifest["shards"]["splits"].items()}
        print(f"tokens (vocab {args.vocab_size}): {splits}")
        manifest["context_shares"] = context_shares(document_token_lengths(corpus, out / "tokenizer.model"))
        print("share of tokens at document position >= N: "
              + ", ".join(f"{n}: {v:.3f}" for n, v in manifest["context_shares"].items()))  # fmt: skip
    manifest["complete"] = True
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
