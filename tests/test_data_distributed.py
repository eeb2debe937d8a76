"""Multi-rank loaders on gloo: 2 simulated nodes x 2 processes, DeepSpeed-style env, node-local caches.

One 4-process job runs every scenario (process start-up dominates on 2 cores):
- data parallel over all 4 ranks: disjoint samples, each rank's batches as in 1-rank runs;
- a model replica spread over non-adjacent ranks (pipeline stages in Megatron's rank order):
  identical batches inside the replica, disjoint across replicas;
- exact resume mid-epoch: run + resume == uninterrupted; and elastic resume of that state
  on a single rank continues with the same global batches.

Two "nodes" on one machine share /dev/shm, while streaming assumes one shared-memory
namespace per node; giving each simulated node its own temp dir (streaming's lock files)
pre-seeded with lock files for the other node's prefixes keeps their registrations apart,
as two machines would be.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tests.distributed import node_tmp, run_distributed
from tests.test_data_common import build_shards

MB, SEQ, K1, K2 = 2, 16, 3, 4


def _simulate_node(rank: int, tmp: Path) -> None:
    """DeepSpeed-launcher env for 2 nodes x 2 processes, and this node's own temp dir."""
    node = rank // 2
    tempfile.tempdir = str(node_tmp(tmp, node, prefixes=64))
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    os.environ.update(LOCAL_SIZE="2", LOCAL_RANK=str(rank % 2), CROSS_RANK=str(node))


def _cfg(remote: Path, tmp: Path, rank: int, phase: str) -> dict:
    local = tmp / f"node{rank // 2}" / "cache" / phase  # node-local cache of the "remote" directory
    return {"train": [{"path": str(remote / "train"), "local": str(local / "train")}],
            "valid": [{"path": str(remote / "val"), "local": str(local / "val")}],
            "seed": 17, "num_canonical_nodes": 2}


def _take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _ids(batches: list[dict]) -> list[list[int]]:
    return [b["row_ids"].tolist() for b in batches]


def _body(rank: int, world: int, remote: str, tmp_dir: str) -> dict:
    import torch

    from ssa_megatron.data.loader import build_loaders
    from ssa_megatron.training.launch import detect_launch

    tmp = Path(tmp_dir)
    _simulate_node(rank, tmp)
    launch = detect_launch()
    assert (launch.launcher, launch.local_world_size, launch.local_rank) == ("deepspeed", 2, rank % 2)
    out: dict = {}
    try:
        build_loaders(_cfg(Path(remote), tmp, rank, "x"), micro_batch_size=MB, seq_len=SEQ, dp_rank=rank,
                      dp_size=4)
    except ValueError as err:
        out["no_launch_error"] = str(err)

    # Data parallel over all ranks.
    train, valid = build_loaders(_cfg(Path(remote), tmp, rank, "dp4"), micro_batch_size=MB, seq_len=SEQ,
                                 dp_rank=rank, dp_size=4, launch=launch, with_row_ids=True)
    out["dp4"] = _ids(_take(train, K1 + K2))
    out["dp4_valid"] = _ids(list(valid))
    cache = tmp / f"node{rank // 2}" / "cache" / "dp4" / "train"
    out["cache_files"] = sorted(p.name for p in cache.iterdir())

    # One replica = ranks {dp, dp + 2} (two pipeline stages, TP=1): Megatron order puts pp outermost.
    dp_rank = rank % 2
    cfg = _cfg(Path(remote), tmp, rank, "pp2")
    train, _ = build_loaders(cfg, micro_batch_size=MB, seq_len=SEQ, dp_rank=dp_rank, dp_size=2, launch=launch,
                             with_row_ids=True)
    batches = _take(train, K1 + K2)
    out["pp2"] = _ids(batches)
    out["pp2_tokens"] = [torch.cat([b["tokens"], b["position_ids"], b["labels"]]).tolist() for b in batches]

    # Same layout, interrupted after K1 batches and resumed from the saved state in a new loader.
    cfg = _cfg(Path(remote), tmp, rank, "resume")
    first, _ = build_loaders(cfg, micro_batch_size=MB, seq_len=SEQ, dp_rank=dp_rank, dp_size=2, launch=launch,
                             with_row_ids=True)
    head = _take(first, K1)
    state = first.state_dict()
    first.close()
    cfg = _cfg(Path(remote), tmp, rank, "resume2")
    second, _ = build_loaders(cfg, micro_batch_size=MB, seq_len=SEQ, dp_rank=dp_rank, dp_size=2,
                              launch=launch, with_row_ids=True)
    second.load_state_dict(state)
    out["resumed"] = _ids(head) + _ids(_take(second, K2))
    out["state"] = state
    return out


def _single_rank(root: Path, mb: int, n: int, state: dict | None = None) -> list[list[int]]:
    import gc

    from ssa_megatron.data.loader import build_loaders

    cfg = {"train": [str(root / "train")], "seed": 17, "num_canonical_nodes": 2}
    train, _ = build_loaders(cfg, micro_batch_size=mb, seq_len=SEQ, dp_rank=0, dp_size=1, with_row_ids=True)
    if state is not None:
        train.load_state_dict(state)
    ids = _ids(_take(train, n))
    train.close()
    gc.collect()
    return ids


def test_two_nodes_dp_replicas_and_exact_resume(tmp_path: Path) -> None:
    root, _, _ = build_shards(tmp_path / "data", n_docs=500, seq_len=SEQ)
    res = run_distributed(_body, world_size=4, args=(str(root), str(tmp_path / "run")), timeout=300)

    # Data parallel: the 4 ranks' micro-batches of a step form the global batch of a 1-rank run
    # with the same global batch size, and no row appears twice.
    ref = _single_rank(root, 4 * MB, K1 + K2)
    for step in range(K1 + K2):
        assert sorted(i for r in res for i in r["dp4"][step]) == sorted(ref[step])
    seen = [i for r in res for b in r["dp4"] for i in b]
    assert len(seen) == len(set(seen))
    valid = [i for r in res for b in r["dp4_valid"] for i in b]
    assert len(valid) == len(set(valid)) and len(valid) > 0
    # Each node downloaded the index and only part of the shards into its own cache.
    n_shards = sum(1 for p in (root / "train").iterdir() if p.name.startswith("shard."))
    for r in (res[0], res[2]):
        shards = [f for f in r["cache_files"] if f.startswith("shard.")]
        assert "index.json" in r["cache_files"] and 0 < len(shards) < n_shards

    # Replicas {0, 2} and {1, 3}: identical batches inside, disjoint across.
    assert res[0]["pp2"] == res[2]["pp2"] and res[1]["pp2"] == res[3]["pp2"]
    for a, b in ((0, 2), (1, 3)):
        for x, y in zip(res[a]["pp2_tokens"], res[b]["pp2_tokens"]):
            assert x == y
    assert not {i for b in res[0]["pp2"] for i in b} & {i for b in res[1]["pp2"] for i in b}
    ref2 = _single_rank(root, 2 * MB, K1 + K2)
    for step in range(K1 + K2):
        assert sorted(res[0]["pp2"][step] + res[1]["pp2"][step]) == sorted(ref2[step])

    assert all("launch=" in r["no_launch_error"] for r in res)

    # Exact resume: run + resume == uninterrupted, on every rank; the state is the same everywhere.
    for r in res:
        assert r["resumed"] == r["pp2"]
        assert r["state"] == res[0]["state"]
    assert res[0]["state"]["streaming"]["sample_in_epoch"] == K1 * MB * 2

    # Elastic: the state saved by 2 data-parallel replicas resumes on 1 rank (same global batch)
    # with exactly the global batches the 2 replicas would have consumed next.
    elastic = _single_rank(root, 2 * MB, K2, state=res[0]["state"])
    for step in range(K2):
        assert sorted(elastic[step]) == sorted(res[0]["pp2"][K1 + step] + res[1]["pp2"][K1 + step])
