"""Pack tokenized documents into fixed rows of ``seq_len + 1`` tokens (numpy only: runs in workers).

A row holds ``seq_len + 1`` tokens of the concatenated, EOS-terminated document stream;
rows do not overlap, so every token of every document lands in exactly one row. Each row
records where documents start inside it and how many of its tokens are real (only the very
last row of a split is padded). MDS columns of a row:

- ``tokens``: ``ndarray:uint16`` (vocab <= 65536) or ``ndarray:int32``, length ``seq_len + 1``;
- ``doc_starts``: ``ndarray:int32``, ascending offsets in ``[0, seq_len]`` at which a
  document begins, always terminated by the sentinel ``seq_len + 1`` (MDS cannot store an
  empty array, and a row inside a long document has no start);
- ``num_tokens``: ``int32``, real tokens in the row (the rest is the pad id);
- ``row_id``: ``int64``, the row's index in its split (for bookkeeping and tests).

:mod:`ssa_megatron.data.batch` turns rows into the trainer's batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# MDS column names and encodings of a packed row.
COL_TOKENS = "tokens"
COL_DOC_STARTS = "doc_starts"
COL_NUM_TOKENS = "num_tokens"
COL_ROW_ID = "row_id"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id (uint16 halves the shards of a <= 64k vocab)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def mds_columns(vocab_size: int) -> dict[str, str]:
    return {
        COL_TOKENS: f"ndarray:{token_dtype(vocab_size).name}",
        COL_DOC_STARTS: "ndarray:int32",
        COL_NUM_TOKENS: "int32",
        COL_ROW_ID: "int64",
    }


@dataclass
class PackedRow:
    tokens: np.ndarray  # [seq_len + 1]
    doc_starts: np.ndarray  # int32 document starts in [0, seq_len], then the sentinel seq_len + 1
    num_tokens: int  # real tokens; the rest is pad
    row_id: int


class RowPacker:
    """Concatenate documents (each already ending in EOS) and cut them into rows.

    ``add`` returns the rows completed by that document; ``finish`` returns the last,
    padded row if any tokens are left. Row ids count from ``first_row_id``.
    """

    def __init__(self, seq_len: int, pad_id: int, dtype: np.dtype, first_row_id: int = 0) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be positive")
        self.row_len = seq_len + 1
        self.pad_id = pad_id
        self.dtype = dtype
        self.next_row_id = first_row_id
        self._buf = np.empty(self.row_len, dtype=dtype)
        self._fill = 0
        self._starts: list[int] = []

    def _emit(self, num_tokens: int) -> PackedRow:
        if num_tokens < self.row_len:
            self._buf[num_tokens:] = self.pad_id
        starts = np.asarray([*self._starts, self.row_len], np.int32)
        row = PackedRow(self._buf.copy(), starts, num_tokens, self.next_row_id)
        self.next_row_id += 1
        self._fill = 0
        self._starts = []
        return row

    def add(self, doc: Sequence[int] | np.ndarray) -> list[PackedRow]:
        ids = np.asarray(doc, dtype=self.dtype)
        if ids.size == 0:
            return []
        rows: list[PackedRow] = []
        self._starts.append(self._fill)
        pos = 0
        while pos < ids.size:
            take = min(self.row_len - self._fill, ids.size - pos)
            self._buf[self._fill : self._fill + take] = ids[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == self.row_len:
                rows.append(self._emit(self.row_len))
        return rows

    def finish(self) -> list[PackedRow]:
        return [self._emit(self._fill)] if self._fill else []


def pack_documents(
    docs: Iterable[Sequence[int]], seq_len: int, pad_id: int, dtype: np.dtype
) -> Iterator[PackedRow]:
    packer = RowPacker(seq_len, pad_id, dtype)
    for doc in docs:
        yield from packer.add(doc)
    yield from packer.finish()
