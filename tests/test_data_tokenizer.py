"""Tokenizer wrapper: round trips, special tokens, determinism, HF tokenizer.json, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssa_megatron.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_sentencepiece,
)
from tests.test_data_common import random_documents, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_round_trip_special_ids_and_byte_fallback(tmp_path: Path, model_type: str) -> None:
    docs = random_documents(random.Random(11), 400)
    path = train_sentencepiece(docs, tmp_path / "m", vocab_size=400, model_type=model_type,
                               user_defined_symbols=["<|sep|>", "<|tool|>"])
    tok = load_tokenizer(path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 400
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert tok.piece_to_id("<unk>") == UNK_ID
    assert tok.piece_to_id("<|sep|>") == 4 and tok.piece_to_id("<|tool|>") == 5
    # User-defined symbols are one token wherever they appear in text.
    assert tok.encode("ab<|sep|>cd").count(4) == 1
    for text in [*random_documents(random.Random(12), 50), "Ünïcödé ✓ 漢字 🙂 tabs\tand  spaces"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Characters never seen in training go through byte pieces, not <unk>.
    assert UNK_ID not in tok.encode("漢字🙂")
    assert tok.encode_batch(["ab cd", "ef"]) == [tok.encode("ab cd"), tok.encode("ef")]


def test_sentencepiece_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    docs = random_documents(random.Random(5), 300)
    a = train_sentencepiece(docs, tmp_path / "a", vocab_size=400, seed=3, input_sentence_size=150)
    b = train_sentencepiece(docs, tmp_path / "b", vocab_size=400, seed=3, input_sentence_size=150)
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a.vocab").read_text() == (tmp_path / "b.vocab").read_text()


def test_special_symbol_clash_and_bad_model_type_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clash"):
        train_sentencepiece(["x y"], tmp_path / "m", vocab_size=50, user_defined_symbols=["</s>"])
    with pytest.raises(ValueError, match="model_type='word'"):
        train_sentencepiece(["x y"], tmp_path / "m", vocab_size=50, model_type="word")
    with pytest.raises(FileNotFoundError, match=r"train_tokenizer\.py"):
        load_tokenizer(tmp_path / "missing.model")


def _write_hf_tokenizer(path: Path, docs: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    tok.save(str(path))


def test_hf_tokenizer_json_llama3_style(tmp_path: Path) -> None:
    docs = random_documents(random.Random(21), 300)
    _write_hf_tokenizer(tmp_path / "tokenizer.json", docs)
    tok = load_tokenizer(tmp_path)  # the directory holding tokenizer.json
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 400
    for text in [*docs[:30], "Ünïcödé 🙂"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(docs[:3]) == [tok.encode(d) for d in docs[:3]]
    chosen = load_tokenizer(tmp_path / "tokenizer.json", pad_token="<|end_of_text|>")
    assert chosen.pad_id == 1
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(tmp_path / "tokenizer.json", eos_token="</s>")


def test_train_tokenizer_cli_reads_txt_jsonl_parquet_and_counts_bad_lines(tmp_path: Path) -> None:
    docs = random_documents(random.Random(31), 240)
    (tmp_path / "a.txt").write_text("\n".join(docs[:80]) + "\n\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", docs[80:160], key="content")
    with (tmp_path / "b.jsonl").open("ab") as fh:
        fh.write(b'{"content": 5}\n{broken\n\xff\xfe\n')
    pq.write_table(pa.table({"content": docs[160:]}), tmp_path / "c.parquet")
    out = tmp_path / "out" / "tok"
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "*.jsonl"), str(tmp_path / "c.parquet")]
    cmd = [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", *inputs,
           "--text-key", "content", "--output", str(out), "--vocab-size", "400", "--special-tokens", "<|x|>",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "from 240 documents" in proc.stdout
    assert "skipped 4 input lines" in proc.stderr and "non-UTF-8" in proc.stderr
    tok = load_tokenizer(out.with_suffix(".model"))
    assert tok.piece_to_id("<|x|>") == 4
    assert json.dumps(tok.decode(tok.encode(docs[200]))) == json.dumps(docs[200])
    missing = subprocess.run([*cmd[:3], str(tmp_path / "nope.txt"), "--output", str(out)],
                             capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
