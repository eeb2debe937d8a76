"""Data pipeline: tokenizers, packed MDS shards, data-parallel streaming loaders, demo corpus.

See :mod:`ssa_megatron.data.loader` for how ranks get their batches and how resumption works.
Names are imported lazily so that tokenizer worker processes do not pay for torch/streaming.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "config",
    "StreamSpec": "config",
    "build_loaders": "loader",
    "rows_to_batch": "batch",
    "load_tokenizer": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "HFTokenizer": "tokenizer",
    "SentencePieceTokenizer": "tokenizer",
    "set_streaming_env": "streaming_env",
    "prepare_dataset": "prepare",
    "prepare_demo_dataset": "demo_corpus",
    "build_demo_corpus": "demo_corpus",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ssa_megatron.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ssa_megatron.data.{_EXPORTS[name]}"), name)
