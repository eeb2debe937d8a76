"""Training data from object storage: a real S3-compatible server (moto's server mode on 127.0.0.1),
an HTTP server and a local-directory remote; prepare_data writes to s3://, training reads from it
through streaming's boto3 path, mixtures draw their configured proportions, text splitting."""

from __future__ import annotations

import contextlib
import functools
import gc
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.run_helpers import flags
from tests.test_data_common import build_tokenizer, random_documents, read_rows

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32
BUCKET = "ssa-train-data"
# What a cluster sets: the endpoint of the store (S3_ENDPOINT_URL, read by streaming and boto3
# here) and credentials in the environment; nothing of it goes into the config.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-v4lue",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The parent environment without launcher variables or ambient AWS settings, plus ``extra``."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("AWS_")}
    # No instance-metadata lookups (seconds of timeouts) and no user credential files.
    env.update(
        AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server on a free local port (started in well under a second)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps one store per Python process: start every module from an empty one.
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"))
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str, **extra: str) -> dict[str, str]:
    return clean_env(S3_ENDPOINT_URL=endpoint, **CREDENTIALS, **extra)


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="s3cr3t-v4lue",
        region_name="us-east-1",
    )


def download_set(endpoint: str, local: Path) -> None:
    """Copy every object below s3://BUCKET/set/ into `local`, keeping the layout below the prefix."""
    client = s3_client(endpoint)
    for obj in client.list_objects_v2(Bucket=BUCKET, Prefix="set/")["Contents"]:
        target = local / obj["Key"][len("set/") :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """Run in-process code under ``env`` (as a launched rank would see it)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_tool(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(directory of .txt files, one document each; sentencepiece model)."""
    tmp = tmp_path_factory.mktemp("corpus")
    docs = random_documents(random.Random(11), 160)
    text = tmp / "text"
    text.mkdir()
    for i, doc in enumerate(docs):
        (text / f"doc{i:04d}.txt").write_text(doc + "\n", encoding="utf-8")
    return text, build_tokenizer(tmp, docs)


def prepare(
    corpus: tuple[Path, Path], output: str, env: dict[str, str], *extra: str, seq_len: int = SEQ
) -> subprocess.CompletedProcess:
    text, tok = corpus
    return run_tool(
        [
            "tools/prepare_data.py",
            "--input",
            str(text),
            "--output",
            output,
            "--tokenizer",
            str(tok),
            "--seq-len",
            str(seq_len),
            "--valid-fraction",
            "0.15",
            "--shard-size",
            "2048",
            "--no-progress",
            *extra,
        ],
        env,
    )


@pytest.fixture(scope="module")
def s3_dataset(s3_endpoint: str, corpus: tuple[Path, Path]) -> str:
    """s3://bucket/set written by tools/prepare_data.py --output s3://... (the cluster recipe's step 1)."""
    s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/set"
    proc = prepare(corpus, uri, s3_env(s3_endpoint))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uri


def tiny_train_args(data: list[str], tok: Path, run_dir: Path, iters: int = 4, *extra: str) -> list[str]:
    """pretrain_ssa.py on the tiniest model (2 layers, hidden 32), fp32 on the CPU."""
    return [
        "pretrain_ssa.py",
        "--config",
        "examples/tiny_cpu.yaml",
        *data,
        *flags(
            {
                "data.build_demo": "false",
                "data.tokenizer": tok,
                "data.seq_length": SEQ,
                "model.num_layers": "2",
                "model.hidden_size": "32",
                "model.ffn_hidden_size": "64",
                "model.num_attention_heads": "2",
                "model.num_query_groups": "1",
                "model.block_size": "8",
                "model.block_count": "2",
                "train.micro_batch_size": "2",
                "train.global_batch_size": "4",
                "train.train_iters": iters,
                "optim.warmup_iters": "1",
                "eval.interval": "0",
                "eval.iters": "1",
                "eval.sparsity": "false",
                "logging.interval": "1",
                "logging.progress": "lines",
                "logging.tensorboard_dir": "null",
                "checkpoint.dir": run_dir / "ckpt",
                "checkpoint.load": "none",
            }
        ),
        *extra,
    ]


def losses(stdout: str) -> list[str]:
    """Each iteration's "loss ... ce ..." as printed (4 decimals)."""
    from ssa_megatron.training.metrics import parse_rows

    return [f"loss {row['loss']} ce {row['ce']}" for row in parse_rows(stdout)]


def test_moto_server_speaks_s3_through_the_same_client_streaming_uses(s3_endpoint: str) -> None:
    from ssa_megatron.data.preflight import read_remote

    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="probe-bucket")
    client.put_object(Bucket="probe-bucket", Key="a/b.txt", Body=b"hello")
    with environ(s3_env(s3_endpoint)):
        assert read_remote("s3://probe-bucket/a/b.txt", 10) == b"hello"
        assert read_remote("s3://probe-bucket/a/missing", 10) is None


def test_prepare_data_writes_to_s3_and_refuses_to_replace_it(
    s3_endpoint: str, s3_dataset: str, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    keys = [
        o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="set/")["Contents"]
    ]
    assert "set/train/index.json" in keys and "set/val/index.json" in keys
    assert sum(k.startswith("set/train/shard.") for k in keys) > 2
    again = prepare(corpus, s3_dataset, s3_env(s3_endpoint))
    assert (
        again.returncode == 2 and "already holds a dataset" in again.stderr and "--overwrite" in again.stderr
    )
    assert "Traceback" not in again.stderr
    # Same rows as a local prepare of the same inputs (the upload is byte-for-byte the local output).
    from ssa_megatron.data.prepare import prepare_dataset

    local = tmp_path / "local"
    prepare_dataset(
        [str(corpus[0])], local, corpus[1], SEQ, valid_fraction=0.15, shard_size_limit=2048, progress=False
    )
    client = s3_client(s3_endpoint)
    for split in ("train", "val"):
        for name in os.listdir(local / split):
            body = client.get_object(Bucket=BUCKET, Key=f"set/{split}/{name}")["Body"].read()
            assert body == (local / split / name).read_bytes(), name


def _loader_rows(cfg, n: int) -> list[int]:
    from ssa_megatron.data.loader import build_loaders

    train, _ = build_loaders(cfg, micro_batch_size=2, seq_len=SEQ, dp_rank=0, dp_size=1, with_row_ids=True)
    it = iter(train)
    ids = [i for _ in range(n) for i in next(it)["row_ids"].tolist()]
    train.close()
    gc.collect()
    return ids


class Section:
    """The training config's data section with defaults (training.config.DataSection)."""

    def __new__(cls, **kw):
        from ssa_megatron.training.config import DataSection

        return DataSection(**kw)


def test_preflight_reads_s3_once_and_the_loader_matches_a_local_copy(
    s3_endpoint: str, s3_dataset: str, tmp_path: Path
) -> None:
    from ssa_megatron.data.preflight import preflight

    local = tmp_path / "copy"
    download_set(s3_endpoint, local)
    with environ(s3_env(s3_endpoint)):
        cfg = preflight(
            Section(path=s3_dataset, cache_dir=str(tmp_path / "cache")), seq_len=SEQ, seed=3, run_dir=None
        )
        assert cfg.validate_hash == "auto" and [s.path for s in cfg.valid] == [f"{s3_dataset}/val"]
        cached = Path(cfg.local_dir(cfg.train[0]))
        assert (cached / "index.json").read_bytes() == (local / "train" / "index.json").read_bytes()
        remote_ids = _loader_rows(cfg, 6)
    assert any(p.name.startswith("shard.") for p in cached.iterdir())  # downloaded, hash-checked
    local_cfg = preflight(Section(path=str(local)), seq_len=SEQ, seed=3, run_dir=None)
    assert _loader_rows(local_cfg, 6) == remote_ids


@contextlib.contextmanager
def http_server(root: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def local_sets(corpus: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two local dataset roots of different sizes (for mixtures and the http/local remotes)."""
    tmp = tmp_path_factory.mktemp("sets")
    a, b = tmp / "a", tmp / "b"
    assert prepare(corpus, str(a), clean_env()).returncode == 0
    from ssa_megatron.data.prepare import prepare_dataset

    docs = random_documents(random.Random(5), 60)
    (tmp / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_dataset(
        [str(tmp / "b.jsonl")], b, corpus[1], SEQ, valid_fraction=0.2, shard_size_limit=2048, progress=False
    )
    return a, b


def test_http_and_local_directory_remotes_go_through_the_cache(
    local_sets: tuple[Path, Path], tmp_path: Path
) -> None:
    from ssa_megatron.data.preflight import preflight

    a, _ = local_sets
    expected = _loader_rows(preflight(Section(path=str(a)), seq_len=SEQ, seed=1, run_dir=None), 5)
    with http_server(a.parent) as url:
        cfg = preflight(
            Section(path=f"{url}/a", cache_dir=str(tmp_path / "http-cache")),
            seq_len=SEQ,
            seed=1,
            run_dir=None,
        )
        assert _loader_rows(cfg, 5) == expected
    # A local directory as the remote of a node-local cache (e.g. a shared filesystem -> local disk).
    cfg = preflight(
        Section(streams=[{"path": str(a), "cache_dir": str(tmp_path / "node")}]),
        seq_len=SEQ,
        seed=1,
        run_dir=None,
    )
    assert _loader_rows(cfg, 5) == expected
    assert any(p.name.startswith("shard.") for p in (tmp_path / "node" / "train").iterdir())
    # The default cache of a run lives under its run directory.
    with http_server(a.parent) as url:
        cfg = preflight(Section(path=f"{url}/a"), seq_len=SEQ, seed=1, run_dir=str(tmp_path / "run"))
    assert cfg.cache_dir == str(tmp_path / "run" / "data_cache")


def test_a_changed_remote_dataset_drops_the_stale_cache(
    local_sets: tuple[Path, Path], tmp_path: Path
) -> None:
    import shutil

    from ssa_megatron.data.preflight import preflight

    a, b = local_sets
    served = tmp_path / "served"
    shutil.copytree(a, served / "set")
    with http_server(served) as url:
        section = Section(path=f"{url}/set", cache_dir=str(tmp_path / "cache"))
        cfg = preflight(section, seq_len=SEQ, seed=1, run_dir=None)
        _loader_rows(cfg, 3)
        cached = Path(cfg.local_dir(cfg.train[0]))
        old_index = (cached / "index.json").read_bytes()
        shutil.rmtree(served / "set")
        shutil.copytree(b, served / "set")  # the dataset was re-written under the same URI
        notes: list[str] = []
        cfg = preflight(section, seq_len=SEQ, seed=1, run_dir=None, log=notes.append)
        assert notes and "changed since it was cached" in notes[0]
        assert (cached / "index.json").read_bytes() != old_index
        rows = read_rows(b / "train")
        ids = _loader_rows(cfg, 4)
    assert max(ids) < len(rows)


def _stream_counts(cfg, n_batches: int, a_rows: set[bytes]) -> tuple[int, int]:
    from ssa_megatron.data.loader import build_loaders

    train, _ = build_loaders(cfg, micro_batch_size=4, seq_len=SEQ, dp_rank=0, dp_size=1)
    it = iter(train)
    from_a = total = 0
    for _ in range(n_batches):
        batch = next(it)
        for row in batch["tokens"]:
            total += 1
            from_a += row.numpy().astype(np.int64).tobytes() in a_rows
    train.close()
    gc.collect()
    return from_a, total


def test_mixture_draws_its_configured_proportions(local_sets: tuple[Path, Path]) -> None:
    from ssa_megatron.data.preflight import preflight

    a, b = local_sets
    a_rows = {np.asarray(r["tokens"][:-1], dtype=np.int64).tobytes() for r in read_rows(a / "train")}
    section = Section(streams=[{"path": str(a), "proportion": 0.25}, {"path": str(b), "proportion": 0.75}])
    cfg = preflight(section, seq_len=SEQ, seed=9, run_dir=None)
    assert [s.proportion for s in cfg.train] == [0.25, 0.75]
    assert len(cfg.valid) == 2 and all(s.proportion is None for s in cfg.valid)  # every val row, unweighted
    cfg.epoch_size = 800
    from_a, total = _stream_counts(cfg, 100, a_rows)
    # Binomial standard error at p = 0.25, n = 400 is 0.022; allow 3 of them.
    assert abs(from_a / total - 0.25) < 0.066, (from_a, total)


@pytest.mark.parametrize(("sample_by", "documents"), [("document", 2), ("paragraph", 5), ("line", 7)])
def test_sample_by_splits_text_files(
    sample_by: str, documents: int, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    from ssa_megatron.data.prepare import prepare_dataset

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("first para\nstill first\n\nsecond para\n\n\nthird\n")
    (tmp_path / "in" / "b.txt").write_text("one\n\ntwo lines\nhere\n")
    summary = prepare_dataset(
        [str(tmp_path / "in")], tmp_path / "out", corpus[1], 8, progress=False, sample_by=sample_by
    )
    assert summary.splits["train"].documents == documents
    # Blank lines separate paragraphs; they are warnings only when reading line by line.
    assert (summary.skipped.get("empty", 0) > 0) == (sample_by == "line")


def test_prepare_data_cli_takes_sample_by(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    args = [
        "tools/prepare_data.py",
        "--input",
        str(tmp_path / "a.txt"),
        "--tokenizer",
        str(corpus[1]),
        "--seq-len",
        "8",
        "--no-progress",
        "--summary-json",
        str(tmp_path / "s.json"),
    ]
    proc = run_tool([*args, "--output", str(tmp_path / "out"), "--sample-by", "paragraph"], clean_env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s.json").read_text())["splits"]["train"]["documents"] == 2
    bad = run_tool([*args, "--output", str(tmp_path / "out2"), "--sample-by", "sentence"], clean_env())
    assert bad.returncode == 2 and "--sample-by: invalid choice: 'sentence'" in bad.stderr
    assert not (tmp_path / "out2").exists()


def test_training_from_s3_matches_training_from_a_local_copy(
    s3_endpoint: str, s3_dataset: str, corpus: tuple[Path, Path], tmp_path: Path
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    tok = corpus[1]
    local = tmp_path / "copy"
    download_set(s3_endpoint, local)
    # Both runs at once: independent processes, each mostly one core.
    with ThreadPoolExecutor(2) as pool:
        remote_run = pool.submit(
            run_tool,
            tiny_train_args(["--data.path", s3_dataset], tok, tmp_path / "s3run"),
            s3_env(s3_endpoint),
        )
        plain_run = pool.submit(
            run_tool, tiny_train_args(["--data.path", str(local)], tok, tmp_path / "localrun"), clean_env()
        )
        remote, plain = remote_run.result(), plain_run.result()
    assert remote.returncode == 0, remote.stderr[-3000:]
    cache = tmp_path / "s3run" / "ckpt" / "data_cache"
    assert any(p.name.startswith("shard.") for d in cache.iterdir() for p in d.iterdir())
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert losses(remote.stdout) == losses(plain.stdout) and len(losses(plain.stdout)) == 4
    assert "s3cr3t-v4lue" not in remote.stdout + remote.stderr  # credentials are never printed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([("data", "validate_hash", "md6")], "data.validate_hash='md6'; choose auto, none or one of"),
        ([("data", "download_retry", "0")], "data.download_retry=0 must be >= 1"),
        ([("data", "download_timeout", "0")], "data.download_timeout=0.0 must be a positive number"),
        ([("data", "predownload", "0")], "data.predownload=0 must be >= 1"),
        ([("data", "shuffle_algo", "py9")], "data.shuffle_algo='py9'; choose one of"),
        ([("data", "cache_dir", "s3://b/cache")], "must be a node-local directory, not a URI"),
        (
            [("data", "path", "s3://b/x"), ("data", "build_demo", "true")],
            "data.build_demo=true needs a local",
        ),
        ([("data", "streams", "[{path: /a}]")], "data.path and data.streams are both set"),
        ([("data", "path", ""), ("data", "streams", "[{path: /a, weight: 2}]")], "unknown keys ['weight']"),
        (
            [("data", "path", ""), ("data", "streams", "[{path: /a, proportion: 1, repeat: 2}]")],
            "sets proportion and repeat; give at most one",
        ),
        (
            [("data", "path", ""), ("data", "streams", "[{path: /a, choose: 1.5}]")],
            "must be a positive integer",
        ),
        ([("data", "path", ""), ("data", "streams", "[{path: /a}, {path: /a}]")], "more than once"),
        ([("data", "path", "s3://")], "names no bucket or host"),
        ([("data", "streams", "{path: /a}")], "data.streams: expected a list"),
    ],
)
def test_data_keys_are_validated_at_load(overrides: list[tuple[str, str, str]], message: str) -> None:
    from ssa_megatron.training.config import ConfigError, load_config

    base = [("data", "path", "/data/set"), ("data", "tokenizer", "/t.model"), ("data", "seq_length", "512")]
    load_config(None, base)  # the base is valid: each case fails for its own key
    with pytest.raises(ConfigError) as err:
        load_config(None, base + overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_known_hashes_and_shuffles_are_streamings() -> None:
    from streaming.base.hashing import get_hashes
    from streaming.base.shuffle import algos

    from ssa_megatron.data.sources import HASH_ALGOS, SHUFFLE_ALGOS

    assert set(HASH_ALGOS) == set(get_hashes()) and set(SHUFFLE_ALGOS) == set(algos)


# --- two nodes from s3:// -------------------------------------------------------------------------
# Two torchrun agents x 2 processes (c10d rendezvous on localhost), each "node" with its own cache
# directory, training pretrain_ssa.py from s3:// end to end; then the same job stopped half-way and
# resumed: its loss curve equals the uninterrupted one bitwise (CPU, fp32).


def _torchrun_job(
    tmp_path: Path, name: str, s3_endpoint: str, data: str, tok: Path, *extra: str
) -> list[str]:
    from tests.distributed import torchrun_two_nodes

    run_dir = tmp_path / "job"  # shared by both "nodes", like a checkpoint directory on shared storage

    def args_of_node(node: int) -> list[str]:
        return tiny_train_args(
            ["--data.path", data], tok, run_dir, 6, "--parallel.tensor", "2", "--model.num_query_groups", "2",
            "--train.global_batch_size", "4",
            "--data.cache_dir", str(tmp_path / f"node{node}-cache"),  # each node's own local cache
            "--logging.tensorboard_dir", str(tmp_path / f"tb-{name}"), *extra,
        )

    env = s3_env(s3_endpoint, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return torchrun_two_nodes(tmp_path, name, 2, args_of_node, env, timeout=900)


def _ce_curve(tb_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curve: dict[int, float] = {}
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for event in acc.Scalars("train/ce_loss"):
            curve[event.step] = event.value
    return curve


# Three jobs of 4 processes: with -m slow. Each part is in the default run on its own: two torchrun agents
# (test_training_launchers.py), two nodes resuming exactly (test_data_distributed.py), training from s3://
# equal to training from a local copy (test_training_from_s3_matches_training_from_a_local_copy).
@pytest.mark.slow
def test_two_nodes_train_from_s3_and_resume_exactly(
    s3_endpoint: str, s3_dataset: str, corpus, tmp_path: Path
) -> None:
    tok = corpus[1]
    whole = tmp_path / "whole"
    whole.mkdir()
    _torchrun_job(whole, "whole", s3_endpoint, s3_dataset, tok)
    for node in range(2):
        cache = whole / f"node{node}-cache"
        # Each node filled its own cache (index from the preflight, shards its ranks read).
        assert list(cache.rglob("index.json")) and list(cache.rglob("shard.*")), node
    parts = tmp_path / "parts"
    parts.mkdir()
    _torchrun_job(parts, "first", s3_endpoint, s3_dataset, tok, "--train.stop_after", "3")
    logs = _torchrun_job(parts, "second", s3_endpoint, s3_dataset, tok, "--checkpoint.load", "auto")
    assert any("resumed from" in log and "at iteration 3" in log for log in logs), logs[0][-3000:]
    expected = _ce_curve(whole / "tb-whole")
    resumed = {**_ce_curve(parts / "tb-first"), **_ce_curve(parts / "tb-second")}
    assert sorted(expected) == list(range(1, 7)), expected
    assert resumed == expected  # bitwise: the same samples in the same order, the same arithmetic
