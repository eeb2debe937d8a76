"""Row packing and batch derivation against plain per-token reference loops on random documents."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssa_megatron.data.batch import row_fields, rows_to_batch
from ssa_megatron.data.packing import (
    COL_DOC_STARTS,
    COL_NUM_TOKENS,
    COL_ROW_ID,
    COL_TOKENS,
    RowPacker,
    pack_documents,
    token_dtype,
)


def _random_docs(rng: np.random.Generator, n: int, row_len: int, vocab: int) -> list[np.ndarray]:
    lengths = rng.choice([1, 2, row_len - 1, row_len, row_len + 1, 3 * row_len + 2, 7], size=n)
    lengths = np.where(rng.random(n) < 0.5, rng.integers(1, 2 * row_len, size=n), lengths)
    return [rng.integers(4, vocab, size=int(k)) for k in lengths]


def _reference_rows(docs: list[np.ndarray], row_len: int, pad: int) -> list[tuple[list[int], list[int], int]]:
    """Token by token: (row tokens, document starts in the row, real token count)."""
    rows, cur, starts = [], [], []
    for doc in docs:
        for j, t in enumerate(doc.tolist()):
            if j == 0:
                starts.append(len(cur))
            cur.append(t)
            if len(cur) == row_len:
                rows.append((cur, starts, row_len))
                cur, starts = [], []
    if cur:
        rows.append((cur + [pad] * (row_len - len(cur)), starts, len(cur)))
    return rows


@pytest.mark.parametrize("seq_len", [1, 7, 32])
def test_packer_matches_token_by_token_reference(seq_len: int) -> None:
    rng = np.random.default_rng(seq_len)
    docs = _random_docs(rng, 60, seq_len + 1, 50_000)
    rows = list(pack_documents(docs, seq_len, pad_id=3, dtype=token_dtype(50_000)))
    ref = _reference_rows(docs, seq_len + 1, 3)
    assert len(rows) == len(ref)
    for i, (row, (tokens, starts, n)) in enumerate(zip(rows, ref)):
        assert row.row_id == i
        assert row.tokens.tolist() == tokens
        assert row.doc_starts.tolist() == [*starts, seq_len + 1]  # sentinel closes the list
        assert row.num_tokens == n
    # Every token of every document, exactly once, in order.
    flat = np.concatenate([r.tokens[: r.num_tokens] for r in rows])
    assert np.array_equal(flat, np.concatenate(docs))


def test_packer_row_ids_continue_and_empty_docs_are_ignored() -> None:
    packer = RowPacker(4, pad_id=0, dtype=np.dtype(np.int32), first_row_id=10)
    assert packer.add([]) == []
    rows = packer.add(np.arange(1, 12)) + packer.finish()
    assert [r.row_id for r in rows] == [10, 11, 12]
    assert rows[-1].num_tokens == 1 and rows[-1].tokens.tolist() == [11, 0, 0, 0, 0]
    assert packer.finish() == []


def test_token_dtype_fits_vocab() -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(128_256) == np.int32
    with pytest.raises(ValueError, match="seq_len=0"):
        RowPacker(0, 0, np.dtype(np.int32))


def _reference_fields(starts: list[int], num_tokens: int, seq_len: int) -> tuple[list[int], list[float]]:
    pos, mask, p = [], [], 0
    for j in range(seq_len):
        p = 0 if (j == 0 or j in starts) else p + 1
        pos.append(p)
        target = j + 1
        mask.append(0.0 if (target in starts or target >= num_tokens) else 1.0)
    return pos, mask


def test_batch_fields_match_reference_on_random_rows() -> None:
    rng = np.random.default_rng(1)
    seq_len = 24
    docs = _random_docs(rng, 80, seq_len + 1, 1000)
    rows = list(pack_documents(docs, seq_len, pad_id=2, dtype=np.dtype(np.uint16)))
    assert any(r.num_tokens < seq_len + 1 for r in rows) and any(seq_len in r.doc_starts for r in rows)
    samples = [{COL_TOKENS: r.tokens, COL_DOC_STARTS: r.doc_starts, COL_NUM_TOKENS: r.num_tokens,
                COL_ROW_ID: r.row_id} for r in rows]
    batch = rows_to_batch(samples, seq_len)
    assert batch["tokens"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    assert batch["tokens"].shape == (len(rows), seq_len)
    for i, r in enumerate(rows):
        assert batch["tokens"][i].tolist() == r.tokens[:-1].tolist()
        assert batch["labels"][i].tolist() == r.tokens[1:].tolist()
        pos, mask = _reference_fields(r.doc_starts[:-1].tolist(), r.num_tokens, seq_len)
        assert batch["position_ids"][i].tolist() == pos
        assert batch["loss_mask"][i].tolist() == mask
    assert batch["row_ids"].tolist() == list(range(len(rows)))
    # Every EOS -> next-document target is masked: the model never predicts across documents.
    pos, mask = row_fields(np.array([0, 5, seq_len, seq_len + 1], np.int32), seq_len + 1, seq_len)
    assert mask[4] == 0 and mask[seq_len - 1] == 0 and pos[5] == 0 and pos[4] == 4


def test_rows_of_wrong_length_are_refused() -> None:
    sample = {COL_TOKENS: np.arange(9), COL_DOC_STARTS: np.array([0, 9]), COL_NUM_TOKENS: 9, COL_ROW_ID: 0}
    with pytest.raises(ValueError, match="seq_len=16 needs 17"):
        rows_to_batch([sample], 16)


def test_document_boundaries_from_position_ids() -> None:
    """The batch's position_ids restarts are the documents the model's kernels see, per row; a row
    always starts one, whatever its first position says."""
    from ssa_megatron.model.attention import document_cu_seqlens

    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3], [3, 4, 0, 1, 2]])
    rows = document_cu_seqlens(pos)
    assert [r.tolist() for r in rows] == [[0, 3, 5], [0, 1, 5], [0, 2, 5]]
    assert all(r.dtype == torch.int32 for r in rows)
