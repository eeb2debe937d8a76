"""Provenance of token ids: shards and checkpoints record the tokenizer's fingerprint, and training,
evaluation and export refuse another tokenizer unless told to; demo data is never rebuilt in place.

Bad inputs go through the real entry points (``pretrain_ssa.py``, ``tools/evaluate.py``,
``tools/convert_to_hf.py``): exit 2, one line on stderr naming the value, no traceback, and every
file of the data, checkpoint and output directories as it was.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssa_megatron.data.tokenizer import (
    FINGERPRINT_FILE,
    TokenizerMismatch,
    check_run_tokenizer,
    read_fingerprint,
    tokenizer_fingerprint,
    write_fingerprint,
)
from tests.run_helpers import default_and_slow
from tests.test_data_common import build_shards, build_tokenizer, random_documents

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shards written with tokenizer A, a second tokenizer B, a checkpoint dir trained with A."""
    base = tmp_path_factory.mktemp("provenance")
    data, tok_a, _docs = build_shards(base / "a", n_docs=120)
    (base / "b").mkdir()
    tok_b = build_tokenizer(base / "b", random_documents(random.Random(5), 120), vocab_size=500)
    ckpt = base / "ckpt"
    (ckpt / "iter_0000002").mkdir(parents=True)
    (ckpt / "iter_0000002" / "complete.json").write_text(json.dumps({"iteration": 2}))
    (ckpt / "iter_0000002" / "config.yaml").write_text(f"data:\n  path: {data}\n  tokenizer: {tok_a}\n")
    (ckpt / "latest").write_text("iter_0000002\n")
    write_fingerprint(ckpt, tokenizer_fingerprint(tok_a), role="checkpoint")
    return {"data": data, "a": tok_a, "b": tok_b, "ckpt": ckpt, "base": base}


def _snapshot(*dirs: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for d in dirs:
        for dirpath, _, files in os.walk(d):
            for name in files:
                path = Path(dirpath) / name
                st = path.stat()
                out[str(path)] = (st.st_size, st.st_mtime_ns)
    return out


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # torch's own import-time log lines ("W1207 ... No CUDA runtime is found") are not ours.
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and not re.match(r"[WI]\d{4} ", ln)]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- the fingerprint itself ------------------------------------------------------------------------


def test_shards_record_the_tokenizer_that_wrote_them(world: dict[str, Path]) -> None:
    for split in ("train", "val"):
        recorded = read_fingerprint(world["data"] / split)
        assert recorded is not None and recorded["role"] == "shards"
        assert recorded["sha256"] == tokenizer_fingerprint(world["a"])["sha256"]
    fa, fb = tokenizer_fingerprint(world["a"]), tokenizer_fingerprint(world["b"])
    assert fa["vocab_size"] == 400 and fb["vocab_size"] == 500 and fa["sha256"] != fb["sha256"]
    assert (fa["bos_id"], fa["eos_id"], fa["pad_id"]) == (1, 2, 3)


def test_training_check_refuses_another_tokenizer_unless_allowed(world: dict[str, Path]) -> None:
    from ssa_megatron.data.tokenizer import load_tokenizer

    splits = [world["data"] / "train", world["data"] / "val"]
    tok_b = load_tokenizer(world["b"])
    with pytest.raises(TokenizerMismatch, match=r"the shards in .*train.*data\.allow_tokenizer_mismatch"):
        check_run_tokenizer(world["b"], tok_b, split_dirs=splits, load_path=None, allow_mismatch=False)
    check_run_tokenizer(world["b"], tok_b, split_dirs=splits, load_path=None, allow_mismatch=True)
    tok_a = load_tokenizer(world["a"])
    assert check_run_tokenizer(world["a"], tok_a, split_dirs=splits, load_path=world["ckpt"] / "iter_0000002",
                               allow_mismatch=False)["vocab_size"] == 400


# --- bad inputs through the entry points ----------------------------------------------------------


def _pretrain_args(world: dict[str, Path], ckpt: Path, *extra: str) -> list[str]:
    pairs = {
        "data.path": str(world["data"]), "data.tokenizer": str(world["a"]), "data.seq_length": "16",
        "model.num_layers": "1", "model.hidden_size": "32", "model.ffn_hidden_size": "64",
        "model.num_attention_heads": "2", "model.num_query_groups": "1", "model.block_size": "4",
        "model.block_count": "2", "train.precision": "fp32", "train.device": "cpu",
        "parallel.distributed_optimizer": "false", "train.micro_batch_size": "2",
        "train.global_batch_size": "2", "train.train_iters": "1", "optim.warmup_iters": "0",
        "checkpoint.dir": str(ckpt), "eval.at_end": "false", "logging.tensorboard_dir": "null",
    }
    args = [x for k, v in pairs.items() for x in ("--" + k, v)]
    return [str(ROOT / "pretrain_ssa.py"), "--config", str(ROOT / "examples" / "tiny_cpu.yaml"),
            "--data.build_demo", "false", *args, *extra]


# A tokenizer that is not the data's or the checkpoint's, and demo data of other parameters, in the default
# run; a foreign directory taken for demo data and a damaged record with -m slow.
@pytest.mark.parametrize(
    "case",
    default_and_slow(
        ["shards", "checkpoint", "demo_params", "demo_foreign", "bad_record"],
        default=("shards", "checkpoint", "demo_params"),
    ),
)
def test_pretrain_refuses(case: str, world: dict[str, Path], tmp_path: Path) -> None:
    fresh = tmp_path / "fresh_ckpt"
    if case == "shards":  # tokenizer B on shards written by A
        args = _pretrain_args(world, fresh, "--data.tokenizer", str(world["b"]))
        needles = [str(world["b"]), "the shards in", "data.allow_tokenizer_mismatch=true"]
    elif case == "checkpoint":  # resuming a checkpoint trained with A on data and tokenizer B
        data_b = tmp_path / "data_b"
        from ssa_megatron.data.prepare import prepare_dataset

        corpus = tmp_path / "c.jsonl"
        docs = random_documents(random.Random(1), 60)
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        prepare_dataset([str(corpus)], data_b, world["b"], 16, valid_fraction=0.2, progress=False)
        args = _pretrain_args(world, world["ckpt"], "--data.path", str(data_b),
                              "--data.tokenizer", str(world["b"]))
        needles = [str(world["b"]), f"the checkpoint {world['ckpt'] / 'iter_0000002'}"]
    elif case == "demo_params":  # demo data built with seed 1234, this run asks for seed 7
        demo = tmp_path / "demo"
        demo.mkdir()
        params = {"version": 1, "seq_len": 16, "vocab_size": 4096, "target_bytes": 3_000_000,
                  "valid_fraction": 0.05, "seed": 1234, "model_type": "bpe"}
        (demo / "demo.json").write_text(json.dumps({"params": params}))
        args = _pretrain_args(world, fresh, "--data.path", str(demo), "--data.build_demo", "true",
                              "--train.seed", "7")
        needles = [str(demo), "seed=1234 (asked: 7)", "new directory"]
    elif case == "demo_foreign":  # a directory of the user's own files
        demo = tmp_path / "mine"
        demo.mkdir()
        (demo / "notes.txt").write_text("keep me")
        args = _pretrain_args(world, fresh, "--data.path", str(demo), "--data.build_demo", "true")
        needles = [str(demo), "demo.json"]
    else:  # a damaged record in the checkpoint directory
        damaged = tmp_path / "damaged"
        (damaged / "iter_0000001").mkdir(parents=True)
        (damaged / "iter_0000001" / "complete.json").write_text(json.dumps({"iteration": 1}))
        (damaged / "latest").write_text("iter_0000001\n")
        (damaged / FINGERPRINT_FILE).write_text("{not json")
        args = _pretrain_args(world, damaged)
        needles = [str(damaged / FINGERPRINT_FILE), "unreadable"]
    before = _snapshot(world["base"], tmp_path)
    proc = _run(args, tmp_path)
    _assert_refused(proc, *needles)
    assert _snapshot(world["base"], tmp_path) == before


@pytest.mark.parametrize("case", ["tokenizer", "data"])
def test_evaluate_refuses(case: str, world: dict[str, Path], tmp_path: Path) -> None:
    if case == "tokenizer":  # --tokenizer B against a checkpoint trained with A
        args = ["--checkpoint", str(world["ckpt"]), "--data", str(world["data"]),
                "--tokenizer", str(world["b"])]
        needles = [str(world["b"]), "--allow-tokenizer-mismatch"]
    else:  # shards written by B against a checkpoint trained with A
        data_b = tmp_path / "val_b"
        data_b.mkdir()
        (data_b / "index.json").write_text("{}")
        write_fingerprint(data_b, tokenizer_fingerprint(world["b"]), role="shards")
        args = ["--checkpoint", str(world["ckpt"]), "--data", str(data_b)]
        needles = [f"the shards in {data_b}", "--allow-tokenizer-mismatch"]
    before = _snapshot(world["base"], tmp_path)
    proc = _run([str(ROOT / "tools" / "evaluate.py"), *args, "--out", str(tmp_path / "out")], tmp_path)
    _assert_refused(proc, *needles)
    assert _snapshot(world["base"], tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["explicit", "config_default_replaced"])
def test_convert_to_hf_refuses_to_ship_another_tokenizer(
    case: str, world: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = world["ckpt"]
    if case == "explicit":
        extra = ["--tokenizer", str(world["b"])]
        needles = [str(world["b"]), "--allow-tokenizer-mismatch"]
    else:  # the config's data.tokenizer was replaced by another file after training
        ckpt = tmp_path / "ckpt"
        (ckpt / "iter_0000002").mkdir(parents=True)
        replaced = tmp_path / "tok.model"
        replaced.write_bytes(world["b"].read_bytes())
        (ckpt / "iter_0000002" / "config.yaml").write_text(f"data:\n  tokenizer: {replaced}\n")
        (ckpt / "latest").write_text("iter_0000002\n")
        write_fingerprint(ckpt, tokenizer_fingerprint(world["a"]), role="checkpoint")
        extra = []
        needles = [str(replaced), "the checkpoint"]
    before = _snapshot(world["base"], tmp_path)
    out = tmp_path / "hf"
    tool = str(ROOT / "tools" / "convert_to_hf.py")
    proc = _run([tool, "--checkpoint", str(ckpt), "--out", str(out), *extra], tmp_path)
    _assert_refused(proc, *needles)
    assert _snapshot(world["base"], tmp_path) == before and not out.exists()


def test_a_saved_checkpoint_records_its_tokenizer_and_refuses_another_at_resume(
    world: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = tmp_path / "run"
    proc = _run(_pretrain_args(world, ckpt, "--train.train_iters", "2"), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recorded = read_fingerprint(ckpt)
    assert recorded is not None and recorded["sha256"] == tokenizer_fingerprint(world["a"])["sha256"]
    # Resuming it (more iterations) with tokenizer B is refused before anything is loaded or written.
    before = _snapshot(ckpt)
    proc = _run(_pretrain_args(world, ckpt, "--train.train_iters", "4", "--data.tokenizer", str(world["b"]),
                               "--data.allow_tokenizer_mismatch", "false"), tmp_path)
    _assert_refused(proc, str(world["b"]), "data.allow_tokenizer_mismatch=true")
    assert _snapshot(ckpt) == before
