# ruff: noqa: F811 - pytest fixtures imported from tests.test_data_remote are parameters here
"""Bad data inputs through the real entry points (pretrain_ssa.py, tools/prepare_data.py): each one
exits 2 with one line naming the value and the fix, no traceback, and leaves the directories as
they were. The store is a real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.run_helpers import default_and_slow
from tests.test_data_remote import (  # noqa: F401 (fixtures)
    BUCKET,
    corpus,
    free_port,
    prepare,
    run_tool,
    s3_client,
    s3_dataset,
    s3_endpoint,
    s3_env,
    tiny_train_args,
)


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size: what "nothing on disk changed" compares."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(proc, exit_code: int = 2) -> str:
    assert proc.returncode == exit_code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def corrupt_sets(s3_endpoint: str, s3_dataset: str) -> dict[str, str]:
    """Copies of the dataset with its first shard damaged, and with every later shard damaged."""
    client = s3_client(s3_endpoint)
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix="set/")["Contents"]
    out = {}
    for name, damaged in (
        ("first", lambda key: key.endswith("shard.00000.mds.zstd")),
        ("later", lambda key: "shard." in key and "shard.00000." not in key),
    ):
        for obj in objects:
            body = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
            if "/train/" in obj["Key"] and damaged(obj["Key"]):
                body = body[:-8] + bytes(b ^ 0xFF for b in body[-8:])
            client.put_object(Bucket=BUCKET, Key=f"{name}/" + obj["Key"][len("set/") :], Body=body)
        out[name] = f"s3://{BUCKET}/{name}"
    return out


Case = Callable[[dict[str, str], str, Path], tuple[list[str], dict[str, str]]]


def _reading(path: str) -> Case:
    """A case that sets only data.path (``{name}`` stands for the fixture's data set `name`), with the
    store's endpoint and credentials in the environment."""
    return lambda ds, ep, tmp: (["--data.path", path.format(**ds)], s3_env(ep))


CASES: dict[str, tuple[Case, str]] = {
    "unreachable-endpoint": (
        lambda ds, ep, tmp: (["--data.path", ds["good"]], s3_env(f"http://127.0.0.1:{free_port()}")),
        "cannot reach the S3 endpoint http://127.0.0.1:",
    ),
    "wrong-bucket": (
        _reading("s3://no-such-bucket/set"),
        "bucket 'no-such-bucket' does not exist",
    ),
    "no-credentials": (
        lambda ds, ep, tmp: (
            ["--data.path", ds["good"]],
            {
                k: v
                for k, v in s3_env(ep).items()
                if not k.startswith("AWS_") or "FILE" in k or "METADATA" in k
            },
        ),
        "no S3 credentials for s3://",
    ),
    "corrupted-first-shard": (
        _reading("{first}"),
        "shard.00000.mds.zstd fails its xxh64 hash (corrupted)",
    ),
    "corrupted-shard-mid-run": (
        _reading("{later}"),
        "data error: shard s3://ssa-train-data/later/train/shard.",
    ),
    "cache-not-writable": (
        lambda ds, ep, tmp: (
            ["--data.path", ds["good"], "--data.cache_dir", str(tmp / "a-file" / "cache")],
            s3_env(ep),
        ),
        "is not writable",
    ),
    "credentials-in-uri": (
        _reading("https://user:secret@example.com/set"),
        "data.path carries credentials in the URI",
    ),
    "unknown-scheme": (
        _reading("ftp://host/set"),
        "scheme ftp:// is not readable",
    ),
    "mixed-weights": (
        lambda ds, ep, tmp: (
            [
                "--data.path",
                "",
                "--data.streams",
                f"[{{path: {ds['good']}, proportion: 0.5}}, {{path: {ds['first']}}}]",
            ],
            s3_env(ep),
        ),
        "proportion is set on some streams only",
    ),
}


# Failures found by the preflight on a reachable store: checked in-process (the same function the
# entry point calls on rank 0) to save a process start each; the entry point's handling of a
# PreflightError (exit 2, one line) is covered by the cases above.
PREFLIGHT_CASES = {
    "missing-split": (
        {"path": f"s3://{BUCKET}/nothing-here"},
        f"data.path='s3://{BUCKET}/nothing-here' has no train/index.json",
    ),
    "other-seq-length": (
        {"seq_length": 64},
        "hold 33 tokens (written with --seq-len 32) but data.seq_length=64",
    ),
    "hash-not-in-shards": (
        {"validate_hash": "sha256"},
        "were written without sha256 hashes (data.validate_hash=sha256); set data.validate_hash to one of",
    ),
    "other-tokenizer": (
        {"tokenizer": "other"},
        f"is not the one the shards in s3://{BUCKET}/set/train recorded",
    ),
    "missing-explicit-valid": (
        {"valid_streams": [{"path": f"s3://{BUCKET}/nothing-here"}]},
        f"data.valid_streams[0].path='s3://{BUCKET}/nothing-here' has no val/index.json",
    ),
}


@pytest.mark.parametrize("case", list(PREFLIGHT_CASES))
def test_preflight_names_the_uri_and_the_fix(
    case: str, s3_endpoint: str, s3_dataset: str, corpus, other_tokenizer: str, tmp_path: Path
) -> None:
    from ssa_megatron.data.preflight import PreflightError, preflight
    from ssa_megatron.training.config import DataSection
    from tests.test_data_remote import environ

    keys, message = PREFLIGHT_CASES[case]
    keys = {
        "path": s3_dataset,
        "tokenizer": str(corpus[1]),
        "seq_length": 32,
        "cache_dir": str(tmp_path / "cache"),
        **keys,
    }
    if keys["tokenizer"] == "other":
        keys["tokenizer"] = other_tokenizer
    section = DataSection(**keys)
    with environ(s3_env(s3_endpoint)), pytest.raises(PreflightError) as err:
        preflight(section, seq_len=section.seq_length, seed=1, run_dir=None)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()  # nothing written before the data checked out
    if case == "other-tokenizer":  # the override key accepts it
        section.allow_tokenizer_mismatch = True
        with environ(s3_env(s3_endpoint)):
            preflight(section, seq_len=section.seq_length, seed=1, run_dir=None)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tokenizer other than the one the shards were written with."""
    import random

    from tests.test_data_common import build_tokenizer, random_documents

    tmp = tmp_path_factory.mktemp("other-tok")
    return str(build_tokenizer(tmp, random_documents(random.Random(99), 120)))


# One case of each kind in the default run (the store unreachable or refusing us, a corrupted shard before
# and during training, the local cache, a secret in the config); every case with -m slow.
@pytest.mark.parametrize(
    "case",
    default_and_slow(
        CASES,
        default=("unreachable-endpoint", "no-credentials", "corrupted-first-shard", "corrupted-shard-mid-run",
                 "cache-not-writable", "credentials-in-uri"),
    ),
)
def test_bad_data_inputs_exit_2_with_one_line(
    case: str,
    s3_endpoint: str,
    s3_dataset: str,
    corrupt_sets: dict[str, str],
    other_tokenizer: str,
    corpus,
    tmp_path: Path,
) -> None:
    make, message = CASES[case]
    (tmp_path / "a-file").write_text("in the way of the cache directory")
    sets = {"good": s3_dataset, "other_tok": other_tokenizer, **corrupt_sets}
    args, env = make(sets, s3_endpoint, tmp_path)
    before = tree(tmp_path)
    proc = run_tool(tiny_train_args([], corpus[1], tmp_path / "run", 4, *args), env)
    line = one_line_error(proc)
    assert message in line, line
    if case == "corrupted-shard-mid-run":
        # It failed while training; nothing was checkpointed over, and no damaged copy stays cached.
        from ssa_megatron.data.config import DataConfig, StreamSpec

        cache = DataConfig(train=[], cache_dir=str(tmp_path / "run" / "ckpt" / "data_cache"))
        train_cache = Path(cache.local_dir(StreamSpec(f"{corrupt_sets['later']}/train")))
        assert (train_cache / "index.json").is_file()
        cached = list(train_cache.glob("shard.*"))
        assert all("shard.00000." in p.name for p in cached), cached
        assert not list((tmp_path / "run" / "ckpt").glob("iter_*"))
    else:
        assert tree(tmp_path) == before  # failed before writing anything
    assert "s3cr3t-v4lue" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("output", "env_of", "message"),
    [
        pytest.param(
            "s3://no-such-bucket/set", lambda ep: s3_env(ep), "bucket 'no-such-bucket' does not exist",
            id="wrong-bucket",
        ),
        # The training cases reach no endpoint in the default run; writing to none is the same refusal.
        pytest.param(
            f"s3://{BUCKET}/new",
            lambda ep: s3_env(f"http://127.0.0.1:{free_port()}"),
            "cannot reach the S3 endpoint",
            id="unreachable-endpoint",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "https://example.com/set", lambda ep: s3_env(ep), "http(s) is read-only here", id="http-output"
        ),
    ],
)
def test_prepare_data_bad_remote_outputs_exit_2(
    output: str,
    env_of,
    message: str,
    s3_endpoint: str,
    corpus,
    tmp_path: Path,
) -> None:
    before = tree(corpus[0])
    proc = prepare(corpus, output, env_of(s3_endpoint))
    assert message in one_line_error(proc)
    assert tree(corpus[0]) == before
    assert "new/" not in str(s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET).get("Contents", []))


def test_corrupted_local_shard_names_file_and_row(tmp_path: Path) -> None:
    """A damaged offset table is named (file and row) when its shard is opened, before any row is drawn."""
    import gc

    from ssa_megatron.data.loader import DataError, build_loaders
    from tests.test_data_common import build_shards

    root, _, _ = build_shards(tmp_path, n_docs=60, seq_len=16)
    first = sorted((root / "train").glob("shard.*"))[0]
    cfg = {
        "train": [{"path": str(root / "train"), "local": str(tmp_path / "cache")}],
        "shuffle": False,
        "validate_hash": "none",
    }
    train, _ = build_loaders(cfg, micro_batch_size=2, seq_len=16, dp_rank=0, dp_size=1)
    next(iter(train))  # decompresses the first shard into the cache
    train.close()
    gc.collect()
    raw = tmp_path / "cache" / first.name.removesuffix(".zstd")
    data = bytearray(raw.read_bytes())
    data[4 + 4 * 3 : 4 + 4 * 4] = (10**6).to_bytes(4, "little")  # row 2's end offset points past the file
    raw.write_bytes(bytes(data))
    train, _ = build_loaders(cfg, micro_batch_size=2, seq_len=16, dp_rank=0, dp_size=1)
    with pytest.raises(DataError, match=rf"shard .*{raw.name} has a damaged offset table at row 2"):
        next(iter(train))
    train.close()
    gc.collect()
    assert os.path.getsize(raw) == len(data)  # the local copy is reported, not deleted


@pytest.mark.timeout(300)
def test_a_shard_failing_its_hash_is_named_and_never_waited_for(tmp_path: Path) -> None:
    """A download that fails its hash hands the shard back (a rank blocked on it must not wait forever),
    deletes the damaged cached copy and leaves the source alone; the loader raises a DataError naming it."""
    import gc

    from streaming.base.dataset import _ShardState

    from ssa_megatron.data.loader import DataError, build_loaders
    from tests.test_data_common import build_shards

    root, _, _ = build_shards(tmp_path, n_docs=60, seq_len=16)
    zipped = sorted((root / "train").glob("shard.*.mds.zstd"))
    victim = zipped[1]
    data = bytearray(victim.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    victim.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    cfg = {
        "train": [{"path": str(root / "train"), "local": str(cache)}],
        "validate_hash": "xxh64",
        "shuffle": False,
    }
    train, _ = build_loaders(cfg, micro_batch_size=2, seq_len=16, dp_rank=0, dp_size=1)
    dataset = train.dataset
    with pytest.raises(DataError, match=rf"shard .*{victim.name}: ValueError: hash mismatch"):
        dataset.prepare_shard(1)
    assert dataset._shard_states[1] == _ShardState.REMOTE
    assert not (cache / victim.name).exists() and victim.read_bytes() == bytes(data)
    with pytest.raises(DataError, match=victim.name):
        for _ in train:
            pass
    train.close()
    gc.collect()


@pytest.mark.timeout(120)
def test_download_threads_that_fail_still_let_the_epoch_end(tmp_path: Path) -> None:
    """Both background threads of an epoch meet a corrupted shard: each still counts as exited, so the
    epoch's end (streaming's ``_Iterator.exit``, which waits for two exits) returns instead of hanging.

    The interleaving is the one that hung training mid-run: the download thread fails on the shard, and
    the ready thread, before it sees the failure, retries the shard handed back and meets the recorded
    error too. Here the two run one after the other in the test's thread."""
    import contextlib
    import gc
    import threading

    import numpy as np
    from streaming.base.dataset import _Iterator

    from ssa_megatron.data.loader import DataError, build_loaders
    from tests.test_data_common import build_shards

    root, _, _ = build_shards(tmp_path, n_docs=60, seq_len=16)
    victim = sorted((root / "train").glob("shard.*.mds.zstd"))[1]
    data = bytearray(victim.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    victim.write_bytes(bytes(data))
    cfg = {
        "train": [{"path": str(root / "train"), "local": str(tmp_path / "cache")}],
        "validate_hash": "xxh64",
        "shuffle": False,
    }
    train, _ = build_loaders(cfg, micro_batch_size=2, seq_len=16, dp_rank=0, dp_size=1)
    dataset = train.dataset
    first = int(dataset.samples_per_shard[0])
    it = _Iterator(np.arange(first, first + 4))  # rows of the corrupted shard 1
    dataset._event = threading.Event()  # what streaming's __iter__ creates before starting the threads
    with pytest.raises(DataError, match=victim.name):
        dataset._prepare_thread(it)
    assert dataset._event.is_set()  # the failure tells the ready thread and the yield loop to stop
    with contextlib.suppress(DataError):  # it stops at the event, or meets the error first: both count
        dataset._ready_thread(it)
    ended = threading.Thread(target=it.exit, daemon=True)
    ended.start()
    ended.join(timeout=30)
    assert not ended.is_alive(), "the epoch's end waits forever for threads that failed"
    train.close()
    gc.collect()
