"""Demo corpus from installed documentation: English prose, deterministic, de-duplicated, cached build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssa_megatron.data.demo_corpus import build_demo_corpus, is_english_prose, prepare_demo_dataset
from ssa_megatron.data.loader import build_loaders
from ssa_megatron.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_prose_filter() -> None:
    prose = ("This function returns the number of items that are stored in the cache, and it is safe to "
             "call it from any thread while the cache is in use.")
    assert is_english_prose(prose)
    tail = " returns the number of items that are stored in the cache for a while."
    assert not is_english_prose(">>> cache.size()" + tail)
    assert not is_english_prose("Args: size (int):" + tail)
    assert not is_english_prose("x = 1; y = 2; z = 3; " * 8)
    assert not is_english_prose(prose.replace("cache", "Cäche"))
    assert not is_english_prose("Short text.")


def test_corpus_is_deterministic_deduplicated_prose(tmp_path: Path) -> None:
    a = build_demo_corpus(tmp_path / "a.jsonl", target_bytes=150_000)
    b = build_demo_corpus(tmp_path / "b.jsonl", target_bytes=150_000)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a.bytes >= 150_000 and a.documents == b.documents and a.packages >= 2
    paragraphs = [p for line in (tmp_path / "a.jsonl").open() for p in json.loads(line)["text"].split("\n\n")]
    assert all(is_english_prose(p) for p in paragraphs)
    assert len({" ".join(p.lower().split()) for p in paragraphs}) == len(paragraphs)


def test_prepare_demo_dataset_builds_once_and_loads(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    demo = prepare_demo_dataset(out, 32, 512, target_bytes=200_000)
    assert demo.built and demo.tokenizer.is_file() and (demo.train / "index.json").is_file()
    assert (demo.valid / "index.json").is_file()
    tok = load_tokenizer(demo.tokenizer)
    assert tok.vocab_size == 512
    assert "the" in tok.decode(tok.encode("the documentation of the package"))
    stamp = (out / "demo.json").stat().st_mtime_ns
    again = prepare_demo_dataset(out, 32, 512, target_bytes=200_000)
    assert not again.built and (out / "demo.json").stat().st_mtime_ns == stamp
    train, valid = build_loaders({"train": [str(demo.train)], "valid": [str(demo.valid)]}, micro_batch_size=2,
                                 seq_len=32, dp_rank=0, dp_size=1)
    batch = next(iter(train))
    assert batch["tokens"].shape == (2, 32) and int(batch["tokens"].max()) < 512
    assert len(valid) > 0
    train.close()
    valid.close()
    with pytest.raises(FileExistsError, match=r"seq_len=32 \(asked: 48\).*new directory"):
        prepare_demo_dataset(out, 48, 512, target_bytes=200_000)  # other parameters: never rebuilt in place
    assert json.loads((out / "demo.json").read_text())["params"]["seq_len"] == 32
    assert (out / "demo.json").stat().st_mtime_ns == stamp
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=r"demo\.json"):
        prepare_demo_dataset(tmp_path / "mine", 32, 512)


def test_build_demo_corpus_cli(tmp_path: Path) -> None:
    out = tmp_path / "c.jsonl"
    cmd = [sys.executable, str(ROOT / "tools" / "build_demo_corpus.py"), "--corpus-only",
           "--output", str(out), "--megabytes", "0.05"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "documents" in proc.stdout and out.stat().st_size > 50_000
