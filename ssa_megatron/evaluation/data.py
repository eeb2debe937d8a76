"""Validation tokens for evaluation: a flat token stream cut into fixed-length windows."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def mds_split_dir(path: Path) -> Path | None:
    """The MDS split directory ``path`` names: itself (has index.json) or its ``val/`` split, else None."""
    for candidate in (path, path / "val"):
        if (candidate / "index.json").is_file():
            return candidate
    return None


def _mds_rows(split_dir: str | Path) -> list[dict]:
    from streaming import LocalDataset

    from ssa_megatron.data.packing import COL_NUM_TOKENS, COL_TOKENS

    dataset = LocalDataset(local=str(split_dir))
    rows = [dataset[i] for i in range(len(dataset))]
    if not rows:
        raise ValueError(f"{split_dir}: the MDS split holds no rows")
    if COL_TOKENS not in rows[0] or COL_NUM_TOKENS not in rows[0]:
        raise ValueError(
            f"{split_dir}: MDS rows have columns {sorted(rows[0])}, not ssa_megatron's packed rows"
        )
    return rows


def load_mds_stream(split_dir: str | Path) -> torch.Tensor:
    """The token stream of a packed MDS split (``ssa_megatron.data`` rows, in row order, padding dropped).

    Rows are consecutive cuts of the concatenated documents, so joining their real tokens restores it.
    """
    from ssa_megatron.data.packing import COL_NUM_TOKENS, COL_TOKENS

    parts = [
        np.asarray(r[COL_TOKENS][: int(r[COL_NUM_TOKENS])], dtype=np.int64) for r in _mds_rows(split_dir)
    ]
    return torch.from_numpy(np.concatenate(parts))


def load_mds_batches(split_dir: str | Path, batch_size: int = 1, max_rows: int | None = None) -> list[dict]:
    """The packed rows as training validation sees them: batch dicts with ``position_ids`` restarting at
    document starts and ``loss_mask`` 0 on each document's first target and on padding."""
    from ssa_megatron.data.batch import rows_to_batch
    from ssa_megatron.data.packing import COL_TOKENS

    rows = _mds_rows(split_dir)[:max_rows]
    seq_len = len(rows[0][COL_TOKENS]) - 1
    batches = []
    for start in range(0, len(rows), batch_size):
        batch = rows_to_batch(rows[start : start + batch_size], seq_len)
        batch.pop("row_ids")
        batches.append(batch)
    return batches


def load_token_stream(path: str | Path, tokenizer: Encoder | None = None) -> torch.Tensor:
    """1-D int64 tokens from a packed MDS split directory (or a data root with ``val/``), a ``.npy`` of token
    ids, or a UTF-8 text file (tokenized with ``tokenizer``)."""
    p = Path(path)
    if p.is_dir():
        split = mds_split_dir(p)
        if split is None:
            raise FileNotFoundError(f"{p} is a directory without an MDS index.json (nor val/index.json)")
        return load_mds_stream(split)
    if not p.is_file():
        raise FileNotFoundError(f"validation data {p} does not exist")
    if p.suffix == ".npy":
        arr = np.load(p)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{p}: expected a 1-D integer array of token ids, got {arr.dtype} {arr.shape}")
        return torch.from_numpy(arr.astype(np.int64))
    if tokenizer is None:
        raise ValueError(
            f"{p} is text; pass a tokenizer (--tokenizer) to encode it, or give a .npy of token ids"
        )
    return torch.tensor(tokenizer.encode(p.read_text(encoding="utf-8")), dtype=torch.int64)


def make_windows(stream: torch.Tensor, length: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[N, length]`` windows from the start of ``stream`` (the tail that does not fill one
    is dropped so every window is scored at the same length)."""
    if length < 2:
        raise ValueError(f"window length must be >= 2 to score a next token, got {length}")
    n = stream.numel() // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"validation stream has {stream.numel()} tokens, fewer than one window of {length}; "
            "give more data or a shorter length"
        )
    return stream[: n * length].view(n, length)


def check_vocab(stream: torch.Tensor, vocab_size: int, source: str) -> None:
    """Tokens beyond the model's vocabulary mean the data was made with another tokenizer."""
    top = int(stream.max()) if stream.numel() else -1
    if top >= vocab_size or (stream.numel() and int(stream.min()) < 0):
        raise ValueError(
            f"{source}: token id {top} is outside the model's vocabulary of {vocab_size}; the data was "
            "tokenized with a different tokenizer than the model's"
        )
