"""Packed MDS rows -> the batch dict of the contract in docs/architecture.md.

- ``tokens = row[:-1]``, ``labels = row[1:]`` (int64 ``[b, s]``);
- ``position_ids`` restart at 0 at each document start and at the row start;
- ``loss_mask`` (float32) is 0 where the target is the first token of a document (it cannot
  be predicted from the previous document, as in the SSA recipe) or padding.

Document boundaries travel only as ``position_ids == 0``; the model turns them into the kernels'
per-row ``cu_seqlens`` (``ssa_megatron.model.attention.document_cu_seqlens``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ssa_megatron.data.packing import COL_DOC_STARTS, COL_NUM_TOKENS, COL_ROW_ID, COL_TOKENS


def row_fields(
    doc_starts: np.ndarray, num_tokens: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids int64 [seq_len], loss_mask float32 [seq_len]) of one row."""
    # The trailing sentinel (seq_len + 1) indexes one past the row; the extra slot absorbs it.
    doc = np.asarray(doc_starts, dtype=np.int64)
    is_doc_start = np.zeros(seq_len + 2, dtype=bool)
    is_doc_start[doc] = True
    starts = is_doc_start.copy()
    starts[0] = True
    idx = np.arange(seq_len, dtype=np.int64)
    # Position of a token = its distance from the latest restart at or before it.
    last_restart = np.maximum.accumulate(np.where(starts[:seq_len], idx, 0))
    position_ids = idx - last_restart
    # Target j+1 is masked when it opens a document or lies in the padding.
    target = idx + 1
    loss_mask = (~is_doc_start[target]) & (target < num_tokens)
    return position_ids, loss_mask.astype(np.float32)


def rows_to_batch(samples: Sequence[dict], seq_len: int) -> dict[str, torch.Tensor]:
    """Collate decoded MDS samples into the batch dict (plus ``row_ids`` for bookkeeping)."""
    tokens = np.stack([np.asarray(s[COL_TOKENS], dtype=np.int64) for s in samples])
    if tokens.shape[1] != seq_len + 1:
        raise ValueError(
            f"shard rows hold {tokens.shape[1]} tokens but seq_len={seq_len} needs {seq_len + 1}; "
            "rebuild the shards with tools/prepare_data.py --seq-len or fix data.seq_length"
        )
    fields = [row_fields(s[COL_DOC_STARTS], int(s[COL_NUM_TOKENS]), seq_len) for s in samples]
    return {
        "tokens": torch.from_numpy(tokens[:, :-1].copy()),
        "labels": torch.from_numpy(tokens[:, 1:].copy()),
        "loss_mask": torch.from_numpy(np.stack([f[1] for f in fields])),
        "position_ids": torch.from_numpy(np.stack([f[0] for f in fields])),
        "row_ids": torch.tensor([int(s[COL_ROW_ID]) for s in samples], dtype=torch.int64),
    }
