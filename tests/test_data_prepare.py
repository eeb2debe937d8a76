"""Shards: every token of every document exactly once and in order, boundaries, bad lines, CLI."""

from __future__ import annotations

import gzip
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssa_megatron.data.prepare import is_valid_document, prepare_dataset
from ssa_megatron.data.tokenizer import load_tokenizer
from tests.test_data_common import build_tokenizer, random_documents, read_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _documents_from_rows(rows: list[dict]) -> list[list[int]]:
    """Re-split the row stream into documents using only the stored boundaries."""
    docs: list[list[int]] = []
    for row in rows:
        tokens = np.asarray(row["tokens"]).tolist()[: int(row["num_tokens"])]
        starts = np.asarray(row["doc_starts"]).tolist()
        assert starts[-1] == len(row["tokens"]) and starts == sorted(set(starts))
        cuts = [0, *starts[:-1], len(tokens)]
        for a, b in itertools.pairwise(cuts):
            if b <= a:
                continue
            if a in starts[:-1]:
                docs.append([])
            docs[-1].extend(tokens[a:b])
    return docs


def _expected(tok, docs: list[str]) -> list[list[int]]:
    return [[*ids, tok.eos_id] for ids in tok.encode_batch(docs)]


def test_every_token_once_in_order_with_boundaries_and_bad_lines(tmp_path: Path) -> None:
    docs = random_documents(random.Random(41), 260)
    tok_path = build_tokenizer(tmp_path, docs)
    tok = load_tokenizer(tok_path)
    write_jsonl(tmp_path / "a.jsonl", docs[:100])
    with (tmp_path / "a.jsonl").open("ab") as fh:  # malformed lines in the middle of the input
        fh.write(b'\n{"text": ""}\n{"text": 3}\n[1, 2]\n{"text": "unterminated\n\xc3\x28 bad utf8\n')
    with (tmp_path / "a.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps({"text": d}) + "\n" for d in docs[100:150]))
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(docs[150:]) + "\n")
    summary = prepare_dataset([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt.gz")], tmp_path / "out",
                              tok_path, 20, shard_size_limit=1 << 11, progress=False, sample_by="line")
    assert summary.skipped == {
        "empty": 2, "malformed JSON": 1, "not a JSON object": 1, "no string 'text' field": 1, "non-UTF-8": 1
    }
    train = summary.splits["train"]
    assert train.documents == len(docs) and train.shards > 2
    rows = read_rows(tmp_path / "out" / "train")
    assert [int(r["row_id"]) for r in rows] == list(range(train.rows))
    assert all(int(r["num_tokens"]) == 21 for r in rows[:-1])
    assert np.asarray(rows[0]["tokens"]).dtype == np.uint16
    assert _documents_from_rows(rows) == _expected(tok, docs)
    assert train.tokens == sum(len(d) for d in _expected(tok, docs))


def test_workers_do_not_change_the_shards_and_split_by_fraction(tmp_path: Path) -> None:
    docs = random_documents(random.Random(43), 700)
    tok_path = build_tokenizer(tmp_path, docs)
    tok = load_tokenizer(tok_path)
    src = write_jsonl(tmp_path / "c.jsonl", docs)
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        summary = prepare_dataset([str(src)], out, tok_path, 12, valid_fraction=0.25, seed=9, workers=workers,
                                  add_bos=True, progress=False)
        outs[workers] = (read_rows(out / "train"), read_rows(out / "val"))
        assert summary.splits["val"].documents + summary.splits["train"].documents == len(docs)
    for a, b in zip(outs[1], outs[2]):
        for column in ("tokens", "doc_starts"):
            assert [np.asarray(r[column]).tolist() for r in a] == [np.asarray(r[column]).tolist() for r in b]
    in_val = [is_valid_document(i, 0.25, 9) for i in range(len(docs))]
    assert 0.15 < np.mean(in_val) < 0.35
    for split_rows, chosen in zip(outs[1], (False, True)):
        expected = [[tok.bos_id, *ids] for ids, v in zip(_expected(tok, docs), in_val) if v == chosen]
        assert _documents_from_rows(split_rows) == expected


def test_prepare_refuses_missing_inputs_and_existing_output(tmp_path: Path) -> None:
    docs = random_documents(random.Random(44), 50)
    tok_path = build_tokenizer(tmp_path, docs)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        prepare_dataset([str(tmp_path / "missing.jsonl")], tmp_path / "o", tok_path, 8, progress=False)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    prepare_dataset([str(src)], tmp_path / "o", tok_path, 8, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_dataset([str(src)], tmp_path / "o", tok_path, 8, progress=False)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        prepare_dataset([str(tmp_path / "empty.jsonl")], tmp_path / "o2", tok_path, 8, progress=False)


def test_prepare_data_cli_with_separate_validation_input_and_stdin(tmp_path: Path) -> None:
    docs = random_documents(random.Random(45), 120)
    tok_path = build_tokenizer(tmp_path, docs)
    write_jsonl(tmp_path / "val.jsonl", docs[100:])
    cmd = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--input", "-", "--valid-input",
           str(tmp_path / "val.jsonl"), "--tokenizer", str(tok_path), "--seq-len", "16", "--output",
           str(tmp_path / "out"), "--no-progress", "--summary-json", str(tmp_path / "s.json")]
    stdin = "".join(json.dumps({"text": d}) + "\n" for d in docs[:100]) + "not json {\n"
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "train: 100 documents" in proc.stdout and "val: 20 documents" in proc.stdout
    assert "tokens/s" in proc.stdout and "skipped input lines: 1 (1 malformed JSON)" in proc.stdout
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["splits"]["train"]["rows"] == len(read_rows(tmp_path / "out" / "train"))
    bad = subprocess.run([*cmd[:2], "--input", "x.jsonl"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--output is required" in bad.stderr


def test_large_hf_vocabulary_is_stored_as_int32(tmp_path: Path) -> None:
    """A Llama-3-sized vocabulary (> 65536 ids) through a tokenizer.json, end to end."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<unk>": 2}
    vocab.update({w: i + 3 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = random.Random(46)
    docs = [" ".join(rng.choice(words[60_000:]) for _ in range(rng.randint(1, 40))) for _ in range(60)]
    write_jsonl(tmp_path / "big.jsonl", docs)
    prepare_dataset([str(tmp_path / "big.jsonl")], tmp_path / "out", tmp_path / "tokenizer.json", 32,
                    progress=False)
    rows = read_rows(tmp_path / "out" / "train")
    assert np.asarray(rows[0]["tokens"]).dtype == np.int32
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.vocab_size == 70_003 and loaded.eos_id == 1
    assert _documents_from_rows(rows) == _expected(loaded, docs)
    assert max(max(d) for d in _documents_from_rows(rows)) > 65_536
