"""Runs on one node never share streaming state: loaders started at the same instant, killed runs.

The race of ``ssa_megatron/data/namespace.py`` (streaming's per-node shared-memory prefixes) is
hit far more cheaply by loaders than by trainings: several "jobs" of 2 gloo processes each, all
processes waiting on one barrier, build their train and validation loaders at the same instant,
many times over; every rank must read exactly the batches it reads when its job runs alone.
Without per-run namespaces this fails within a few repetitions (FileExistsError on
``<prefix>_locals``, or a rank reading another job's sample partition).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.distributed import free_port
from tests.test_data_common import build_shards

JOBS, RANKS, REPEATS, BATCHES = 3, 2, 6, 3
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _tok, _docs = build_shards(tmp_path_factory.mktemp("isolation"), n_docs=200)
    return root


def _config(root: Path, seed: int, cache: Path | None = None) -> dict:
    cfg = {"train": [str(root / "train")], "valid": [str(root / "val")], "seed": seed}
    if cache is not None:
        cfg["cache_dir"] = str(cache)
    return cfg


def _read(cfg: dict, rank: int, world: int) -> list[list[int]]:
    from ssa_megatron.data.loader import build_loaders
    from ssa_megatron.training.launch import LaunchEnv

    launch = LaunchEnv(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                       launcher="torchrun")
    train, valid = build_loaders(cfg, micro_batch_size=2, seq_len=16, dp_rank=rank, dp_size=world,
                                 launch=launch, with_row_ids=True)
    try:
        it = iter(train)
        rows = [next(it)["row_ids"].tolist() for _ in range(BATCHES)]
        assert valid is not None
        rows.append(next(iter(valid))["row_ids"].tolist())
        return rows
    finally:
        train.close()
        valid.close()


def _member(job: int, rank: int, port: int, root: str, barrier, queue) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(RANKS),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(RANKS))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=RANKS)
        cfg = _config(Path(root), seed=100 + job)  # a seed per job: borrowed partitions show
        solo = []
        for turn in range(JOBS):  # each job alone, the others waiting
            barrier.wait()
            if turn == job:
                solo = _read(cfg, rank, RANKS)
            barrier.wait()
        together = []
        for _ in range(REPEATS):
            barrier.wait()
            together.append(_read(cfg, rank, RANKS))
        queue.put((job, rank, None, solo, together))
    except BaseException:
        barrier.abort()
        queue.put((job, rank, traceback.format_exc(), None, None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_jobs_started_together_read_what_they_read_alone(shards: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(JOBS * RANKS), ctx.SimpleQueue()
    procs = []
    for job in range(JOBS):
        port = free_port()
        for rank in range(RANKS):
            proc = ctx.Process(target=_member, args=(job, rank, port, str(shards), barrier, queue))
            proc.start()
            procs.append(proc)
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    errors = [f"job {j} rank {r}:\n{err}" for j, r, err, _, _ in results if err]
    assert not errors, "\n".join(errors)
    for job, rank, _, solo, together in results:
        assert len(solo) == BATCHES + 1
        for repeat, rows in enumerate(together):
            assert rows == solo, f"job {job} rank {rank} read other samples in repetition {repeat}"
    # Different jobs really read different samples, so a borrowed partition cannot go unnoticed.
    firsts = {tuple(map(tuple, solo)) for j, r, _, solo, _ in results if r == 0}
    assert len(firsts) == JOBS


def test_a_rank_attaching_before_its_leader_sized_the_block_waits_for_it() -> None:
    """The window between the creator's ``shm_open`` and ``ftruncate``, held open for 0.3 s."""
    import secrets
    import threading

    import numpy as np
    from streaming.base.shared.scalar import SharedScalar

    from ssa_megatron.data.namespace import SHM_DIR, install

    if not os.path.isdir(SHM_DIR):
        pytest.skip(f"no {SHM_DIR} to create a block in by hand")
    install()
    name = f"ssa-sizing-test-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)  # created, not sized
    sizer = threading.Timer(0.3, os.ftruncate, (fd, 8))
    try:
        sizer.start()
        scalar = SharedScalar(np.int64, name)  # create fails (it exists), so it attaches
        scalar.set(41)
        with open(os.path.join(SHM_DIR, name), "rb") as raw:
            assert int(np.frombuffer(raw.read(8), np.int64)[0]) == 41  # one block, seen by both
    finally:
        sizer.join()
        os.close(fd)
        os.unlink(os.path.join(SHM_DIR, name))


# --- killed runs and live owners ------------------------------------------------------------------

_HOLDER = """
import sys, time
from ssa_megatron.data.loader import build_loaders
cfg = {{"train": [{train!r}], "valid": [{val!r}], "seed": 5, "cache_dir": {cache!r}}}
train, valid = build_loaders(cfg, micro_batch_size=2, seq_len=16, dp_rank=0, dp_size=1)
next(iter(train))
print(train.dataset._shm_prefix_int.namespace, flush=True)
time.sleep(600)
"""


def _start_holder(root: Path, cache: Path) -> tuple[subprocess.Popen, str]:
    code = _HOLDER.format(train=str(root / "train"), val=str(root / "val"), cache=str(cache))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # A process group of its own: killing the group takes its resource tracker too, as SLURM or the OOM killer
    # do, so nothing tidies up after it.
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
                            preexec_fn=os.setsid)
    assert proc.stdout is not None
    namespace = proc.stdout.readline().strip()
    assert namespace.startswith("ssa-"), f"holder did not start (exit {proc.poll()})"
    return proc, namespace


def _traces(namespace: str) -> list[str]:
    import tempfile

    from ssa_megatron.data.namespace import SHM_DIR

    found = []
    for directory in (SHM_DIR, tempfile.gettempdir()):
        if os.path.isdir(directory):
            found += [n for n in os.listdir(directory) if n.startswith(namespace + "_")]
    return found


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.2)


def test_killed_run_neither_blocks_nor_leaks_into_the_next(shards: Path, tmp_path: Path) -> None:
    from ssa_megatron.data.loader import DataError, build_loaders

    cache = tmp_path / "run_cache"
    reference = _read(_config(shards, 5, tmp_path / "reference_cache"), 0, 1)
    proc, namespace = _start_holder(shards, cache)
    try:
        # While it lives, a second run on the same cache is refused with one line naming it.
        with pytest.raises(DataError) as refused:
            build_loaders(_config(shards, 5, cache), micro_batch_size=2, seq_len=16, dp_rank=0, dp_size=1)
        message = str(refused.value)
        assert f"pid {proc.pid}" in message and "\n" not in message and "checkpoint.dir" in message
        assert _traces(namespace)
    finally:
        _kill_group(proc)
    left = _traces(namespace)
    assert any(n.endswith("_locals") for n in left), left  # the kill left its shared memory behind
    # The next run on that cache starts, removes what the dead run left, and reads its own samples.
    assert _read(_config(shards, 5, cache), 0, 1) == reference
    assert not _traces(namespace)


def test_leftovers_of_a_dead_run_are_swept_by_any_later_run(shards: Path, tmp_path: Path) -> None:
    proc, namespace = _start_holder(shards, tmp_path / "dead_cache")
    _kill_group(proc)
    assert _traces(namespace)
    _read(_config(shards, 9, tmp_path / "other_cache"), 0, 1)  # a different run, same node
    assert not _traces(namespace)
    from ssa_megatron.data.namespace import OWNER_SUFFIX, registry_dir

    assert not os.path.exists(os.path.join(registry_dir(), namespace.rsplit("-", 1)[0] + OWNER_SUFFIX))


def test_streaming_names_carry_the_run_namespace(shards: Path, tmp_path: Path) -> None:
    from ssa_megatron.data.loader import build_loaders

    train, valid = build_loaders(_config(shards, 3, tmp_path / "c"), micro_batch_size=2, seq_len=16,
                                 dp_rank=0, dp_size=1)
    namespace = train.dataset._shm_prefix_int.namespace
    assert valid is not None and valid.dataset._shm_prefix_int.namespace == namespace
    try:
        next(iter(train))
        traces = _traces(namespace)
        # streaming's shared memory and its lock files, all under this run's namespace.
        assert {"locals", "barrier", "next_epoch"} <= {n.split("_", 2)[2] for n in traces if "_0000" in n}
        assert any(n.endswith("_filelock") for n in traces)
    finally:
        train.close()
        valid.close()


def test_pretrain_refuses_a_checkpoint_dir_in_use_by_a_live_run(shards: Path, tmp_path: Path) -> None:
    """Two live runs on one checkpoint.dir would share its data cache: the second exits 2 with one line."""
    ckpt = tmp_path / "run"
    holder, namespace = _start_holder(shards, ckpt / "data_cache")  # the live run's cache
    try:
        tok = shards.parent / "tok.model"
        args = [str(ROOT / "pretrain_ssa.py"), "--config", str(ROOT / "examples" / "tiny_cpu.yaml"),
                "--data.build_demo", "false", "--data.path", str(shards), "--data.tokenizer", str(tok),
                "--data.seq_length", "16", "--model.num_layers", "1", "--model.hidden_size", "32",
                "--model.ffn_hidden_size", "64", "--model.num_attention_heads", "2",
                "--model.num_query_groups", "1", "--model.block_size", "4", "--model.block_count", "2",
                "--train.train_iters", "1", "--optim.warmup_iters", "0", "--checkpoint.dir", str(ckpt),
                "--logging.tensorboard_dir", "null"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
        # Ours is the one "pretrain_ssa.py:" line (torch and megatron log their own warnings at start-up).
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("pretrain_ssa.py:")]
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"pid {holder.pid}" in lines[0] and "checkpoint.dir" in lines[0], lines[0]
        assert _traces(namespace)  # the live run's state is untouched
    finally:
        _kill_group(holder)
