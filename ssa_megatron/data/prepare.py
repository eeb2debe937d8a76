"""Text -> tokenized, EOS-terminated documents -> packed rows -> MDS shards (train and val).

Reading and packing run in the main process, in input order, so the output is the same for
any ``workers``; tokenization is spread over ``workers`` processes in ordered chunks.
Documents go to the validation split either from separate ``valid_inputs`` or, with
``valid_fraction``, by a seeded hash of the document's index (stable whatever the chunking).
The columns are those of :func:`ssa_megatron.data.packing.mds_columns`.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from ssa_megatron.data.packing import (
    COL_DOC_STARTS,
    COL_NUM_TOKENS,
    COL_ROW_ID,
    COL_TOKENS,
    PackedRow,
    RowPacker,
    mds_columns,
    token_dtype,
)
from ssa_megatron.data.readers import SAMPLE_BY, ReadStats, expand_inputs, iter_documents
from ssa_megatron.data.sources import display, is_remote
from ssa_megatron.data.tokenizer import (
    FINGERPRINT_FILE,
    load_tokenizer,
    tokenizer_fingerprint,
    write_fingerprint,
)

logger = logging.getLogger(__name__)

TRAIN_SPLIT, VALID_SPLIT = "train", "val"
_CHUNK_DOCS = 256


@dataclass
class SplitSummary:
    documents: int = 0
    tokens: int = 0
    rows: int = 0
    shards: int = 0


@dataclass
class PrepareSummary:
    splits: dict[str, SplitSummary] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "splits": {k: asdict(v) for k, v in self.splits.items()},
            "skipped": dict(self.skipped),
            "seconds": self.seconds,
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
        }

    def format(self) -> str:
        lines = []
        for name, s in self.splits.items():
            lines.append(
                f"{name}: {s.documents} documents, {s.tokens} tokens, {s.rows} rows, {s.shards} shards"
            )
        skipped = sum(self.skipped.values())
        detail = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
        lines.append(f"skipped input lines: {skipped}" + (f" ({detail})" if skipped else ""))
        rate = self.tokens / max(self.seconds, 1e-9)
        lines.append(f"{self.tokens} tokens in {self.seconds:.1f} s ({rate:,.0f} tokens/s)")
        return "\n".join(lines)


def is_valid_document(index: int, fraction: float, seed: int) -> bool:
    """Seeded, order-stable split: document ``index`` goes to validation with probability ``fraction``."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


# Worker-process state: the tokenizer is opened once per worker, not per chunk.
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_path: str, add_bos: bool) -> None:
    tok = load_tokenizer(tokenizer_path)
    _WORKER.update(tok=tok, add_bos=add_bos)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    tok = _WORKER["tok"]
    prefix = [tok.bos_id] if _WORKER["add_bos"] and tok.bos_id is not None else []
    return [np.asarray([*prefix, *ids, tok.eos_id], dtype=np.int64) for ids in tok.encode_batch(texts)]


def _mp_context() -> mp.context.BaseContext:
    # fork starts tokenizer workers in milliseconds; spawn would re-import torch in each.
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods else "spawn")


def _bounded_imap(pool: Any, fn: Any, items: Iterator[list[str]], max_pending: int) -> Iterator[Any]:
    """Ordered map over a pool with at most ``max_pending`` chunks in flight.

    ``Pool.imap`` would drain the whole input into its task queue (the full corpus in RAM).
    """
    pending: deque[Any] = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(islice(docs, size)):
        yield chunk


class _SplitWriter:
    """One split's packer + MDS writer + counters."""

    def __init__(self, out: Path | str, seq_len: int, vocab_size: int, pad_id: int, *,
                 compression: str | None, hashes: Sequence[str], size_limit: int) -> None:
        from streaming import MDSWriter

        self.out = out
        self.packer = RowPacker(seq_len, pad_id, token_dtype(vocab_size))
        # A remote `out` (s3://...) makes MDSWriter stage each shard in a temporary directory and
        # upload it when complete; index.json goes up last, so readers never see a partial split.
        self.writer = MDSWriter(
            out=str(out), columns=mds_columns(vocab_size), compression=compression,
            hashes=list(hashes), size_limit=size_limit,
        )
        self.summary = SplitSummary()

    def _write(self, rows: list[PackedRow]) -> None:
        for row in rows:
            self.writer.write({
                COL_TOKENS: row.tokens,
                COL_DOC_STARTS: row.doc_starts,
                COL_NUM_TOKENS: row.num_tokens,
                COL_ROW_ID: row.row_id,
            })
            self.summary.rows += 1

    def add(self, ids: np.ndarray) -> None:
        self.summary.documents += 1
        self.summary.tokens += int(ids.size)
        self._write(self.packer.add(ids))

    def finish(self, fingerprint: dict | None = None) -> SplitSummary:
        self._write(self.packer.finish())
        if fingerprint is not None:
            # Which tokenizer wrote these ids: training, evaluation and export check it.
            write_fingerprint(self.writer.local, fingerprint, role="shards")
            if self.writer.remote:
                self.writer.executor.submit(self.writer.cloud_writer.upload_file, FINGERPRINT_FILE)
        self.writer.finish()
        self.summary.shards = len(self.writer.shards)
        return self.summary


def _check_remote_output(out: str, overwrite: bool) -> None:
    """Before tokenizing: the store is reachable, the bucket exists, no split is replaced by accident."""
    from ssa_megatron.data.preflight import read_remote

    scheme = out.split("://", 1)[0]
    if scheme in ("http", "https"):
        raise ValueError(f"--output {display(out)}: http(s) is read-only here; write to a local directory or "
                         "an object store (s3://, gs://, ...) and serve that over http")
    for split in (TRAIN_SPLIT, VALID_SPLIT):
        index = f"{out}/{split}/index.json"
        if read_remote(index, 60.0) is not None and not overwrite:
            raise FileExistsError(f"{display(out)}/{split} already holds a dataset; pass overwrite=True "
                                  "(--overwrite) to replace it")


def prepare_dataset(
    inputs: Sequence[str],
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    seq_len: int,
    *,
    valid_inputs: Sequence[str] = (),
    valid_fraction: float = 0.0,
    text_key: str = "text",
    seed: int = 1234,
    add_bos: bool = False,
    workers: int = 1,
    compression: str | None = "zstd",
    hashes: Sequence[str] = ("sha1", "xxh64"),
    shard_size_limit: int = 1 << 26,
    overwrite: bool = False,
    progress: bool = True,
    sample_by: str = "document",
) -> PrepareSummary:
    """Tokenize ``inputs`` and write ``out_dir/train`` and ``out_dir/val`` MDS shards.

    ``out_dir`` may be a URI streaming uploads to (``s3://``, ``gs://``, ``oci://``, ``azure://``,
    ``hf://``, ...): shards are uploaded as they complete, with the same credentials the training
    reads with (environment / provider config; ``S3_ENDPOINT_URL`` for non-AWS stores).
    ``sample_by`` splits text files (see :mod:`ssa_megatron.data.readers`).
    """
    if sample_by not in SAMPLE_BY:
        raise ValueError(f"sample_by={sample_by!r}; choose one of {', '.join(SAMPLE_BY)}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    if valid_inputs and valid_fraction:
        raise ValueError("give either valid_inputs or valid_fraction, not both")
    files = expand_inputs(inputs)
    valid_files = expand_inputs(valid_inputs) if valid_inputs else []
    remote = is_remote(str(out_dir))
    out: Path | str = str(out_dir).rstrip("/") if remote else Path(out_dir)
    if remote:
        _check_remote_output(str(out), overwrite)
    else:
        for split in (TRAIN_SPLIT, VALID_SPLIT):
            target = Path(out) / split
            if target.exists() and any(target.iterdir()):
                if not overwrite:
                    raise FileExistsError(
                        f"{target} already holds files; pass overwrite=True (--overwrite) to replace it"
                    )
                shutil.rmtree(target)
    tok = load_tokenizer(tokenizer_path)
    fingerprint = tokenizer_fingerprint(tokenizer_path, tok)
    # Forked before the shard writers exist, so the children never inherit their threads or files.
    pool = None
    if workers > 1:
        pool = _mp_context().Pool(workers, _init_worker, (str(tokenizer_path), add_bos))
    from tqdm import tqdm

    stats = ReadStats()
    sources = [(files, None)] + ([(valid_files, VALID_SPLIT)] if valid_files else [])
    bar = tqdm(desc="documents", unit="doc", disable=not progress, mininterval=1.0)
    try:
        make = lambda split: _SplitWriter(
            f"{out}/{split}" if remote else Path(out) / split, seq_len, tok.vocab_size, tok.pad_id,
            compression=compression, hashes=hashes, size_limit=shard_size_limit,
        )
        writers = {TRAIN_SPLIT: make(TRAIN_SPLIT)}
        if valid_files or valid_fraction:
            writers[VALID_SPLIT] = make(VALID_SPLIT)
        start = time.perf_counter()
        if pool is None:
            _init_worker(str(tokenizer_path), add_bos)
        index = 0
        for source_files, fixed_split in sources:
            docs = iter_documents(source_files, text_key=text_key, stats=stats, sample_by=sample_by)
            chunks = _chunks(docs, _CHUNK_DOCS)
            if pool is None:
                encoded: Iterator[list[np.ndarray]] = map(_encode_chunk, chunks)
            else:
                encoded = _bounded_imap(pool, _encode_chunk, chunks, 4 * workers)
            for chunk in encoded:
                for ids in chunk:
                    split = fixed_split or (
                        VALID_SPLIT if is_valid_document(index, valid_fraction, seed) else TRAIN_SPLIT
                    )
                    writers[split].add(ids)
                    index += 1
                bar.update(len(chunk))
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
        _WORKER.clear()
    summary = PrepareSummary(
        splits={name: w.finish(fingerprint) for name, w in writers.items()}, skipped=dict(stats.skipped)
    )
    summary.seconds = time.perf_counter() - start
    warning = stats.warning()
    if warning:
        logger.warning(warning)
    if summary.splits[TRAIN_SPLIT].rows == 0:
        reason = warning or "empty input"
        raise ValueError(f"no documents were read from {list(inputs)}; nothing to train on ({reason})")
    return summary
