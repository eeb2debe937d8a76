"""Shared builders for the data tests (synthetic corpora, tokenizers, shards) + their own checks."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np

from ssa_megatron.data.readers import ReadStats, iter_documents


def random_words(rng: random.Random, n: int = 300) -> list[str]:
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 9))) for _ in range(n)]


def random_documents(rng: random.Random, n_docs: int, *, max_words: int = 80) -> list[str]:
    """Sentence-like documents of random words; some are long enough to span several rows."""
    words = random_words(rng)
    docs = []
    for _ in range(n_docs):
        n = rng.choice([1, 2, rng.randint(3, max_words), rng.randint(max_words, 4 * max_words)])
        text = " ".join(rng.choice(words) for _ in range(n))
        docs.append(text[0].upper() + text[1:] + rng.choice([".", "!", "?", ", and 42."]))
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d}) + "\n" for d in docs), encoding="utf-8")
    return path


def build_tokenizer(tmp: Path, docs: list[str], vocab_size: int = 400) -> Path:
    from ssa_megatron.data.tokenizer import train_sentencepiece

    return train_sentencepiece(docs, tmp / "tok", vocab_size=vocab_size, seed=7)


def build_shards(tmp: Path, *, n_docs: int = 300, seq_len: int = 16, seed: int = 0,
                 valid_fraction: float = 0.2) -> tuple[Path, Path, list[str]]:
    """(shard root with train/ and val/, tokenizer model, documents)."""
    from ssa_megatron.data.prepare import prepare_dataset

    docs = random_documents(random.Random(seed), n_docs)
    tmp.mkdir(parents=True, exist_ok=True)
    corpus = write_jsonl(tmp / "corpus.jsonl", docs)
    tok = build_tokenizer(tmp, docs)
    prepare_dataset([str(corpus)], tmp / "mds", tok, seq_len, valid_fraction=valid_fraction,
                    shard_size_limit=1 << 12, progress=False)
    return tmp / "mds", tok, docs


def read_rows(split_dir: Path) -> list[dict]:
    """All rows of a split in storage order (StreamingDataset decompresses the zstd shards)."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(split_dir), batch_size=1, shuffle=False)
    rows = [ds[i] for i in range(ds.num_samples)]
    del ds  # releases its shared memory now
    return rows


def test_random_documents_are_varied_and_read_back_in_order(tmp_path: Path) -> None:
    docs = random_documents(random.Random(3), 200)
    assert len(set(docs)) > 150 and min(map(len, docs)) > 0
    stats = ReadStats()
    assert list(iter_documents([str(write_jsonl(tmp_path / "d.jsonl", docs))], stats=stats)) == docs
    assert stats.documents == 200 and stats.num_skipped == 0
    lengths = np.array([len(d.split()) for d in docs])
    assert lengths.max() > 80 and (lengths <= 2).any()
