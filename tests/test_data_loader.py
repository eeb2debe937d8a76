"""Single-process loaders: the batch contract on real shards, epochs, exact resume, remotes, config."""

from __future__ import annotations

import functools
import gc
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ssa_megatron.data.batch import row_fields
from ssa_megatron.data.config import DataConfig, StreamSpec
from ssa_megatron.data.loader import build_loaders, data_parallel_world
from ssa_megatron.data.streaming_env import set_streaming_env
from tests.test_data_common import build_shards, read_rows

SEQ = 16


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, _, _ = build_shards(tmp_path_factory.mktemp("shards"), n_docs=220, seq_len=SEQ)
    return root


def _loaders(cfg: dict, mb: int, *, seq_len: int = SEQ, row_ids: bool = True):
    """One-rank loaders (data-parallel rank 0 of 1)."""
    return build_loaders(cfg, micro_batch_size=mb, seq_len=seq_len, dp_rank=0, dp_size=1,
                         with_row_ids=row_ids)


def _take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _ids(batches: list[dict]) -> list[int]:
    return [i for b in batches for i in b["row_ids"].tolist()]


def _close(*loaders) -> None:
    for loader in loaders:
        if loader is not None:
            loader.close()
    gc.collect()  # streaming frees a cache directory's shared memory when its dataset is collected


def test_batches_follow_the_contract_and_an_epoch_covers_every_row(shards: Path) -> None:
    rows = read_rows(shards / "train")
    cfg = {"train": [str(shards / "train")], "valid": [str(shards / "val")], "seed": 5}
    train, valid = _loaders(cfg, 3)
    per_epoch = len(train)
    assert per_epoch == len(rows) // 3
    batches = _take(train, per_epoch)
    for batch in batches[:20]:
        assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "row_ids"}
        for j, row_id in enumerate(batch["row_ids"].tolist()):
            row = rows[row_id]
            tokens = np.asarray(row["tokens"], dtype=np.int64)
            assert batch["tokens"][j].tolist() == tokens[:-1].tolist()
            assert batch["labels"][j].tolist() == tokens[1:].tolist()
            pos, mask = row_fields(row["doc_starts"], int(row["num_tokens"]), SEQ)
            assert batch["position_ids"][j].tolist() == pos.tolist()
            assert batch["loss_mask"][j].tolist() == mask.tolist()
    ids = _ids(batches)
    assert len(ids) == len(set(ids)) and len(ids) == per_epoch * 3
    assert ids != sorted(ids)  # shuffled
    # Validation: every row once, in the same order at every evaluation; no row_ids by default.
    first, second = _ids(list(valid)), _ids(list(valid))
    assert first == second and len(first) == len(set(first))
    _close(train, valid)
    plain, _ = _loaders({"train": [str(shards / "train")]}, 2, row_ids=False)
    assert set(next(iter(plain))) == {"tokens", "labels", "loss_mask", "position_ids"}
    _close(plain)


@pytest.mark.parametrize(("stop", "workers"), [(5, 2), ("epoch+2", 0)])
def test_resume_consumes_exactly_the_uninterrupted_samples(shards: Path, stop, workers: int) -> None:
    ref_loader, _ = _loaders({"train": [str(shards / "train")], "seed": 23}, 4)
    # DataLoader worker processes change neither the order nor the resume point.
    cfg = {"train": [str(shards / "train")], "seed": 23, "num_workers": workers}
    k1 = len(ref_loader) + 2 if stop == "epoch+2" else stop  # also across an epoch boundary
    total = k1 + 6
    reference = _ids(_take(ref_loader, total))
    _close(ref_loader)

    first, _ = _loaders(cfg, 4)
    head = _ids(_take(first, k1))
    state = first.state_dict()
    _close(first)
    resumed, _ = _loaders(cfg, 4)
    resumed.load_state_dict(state)
    tail = _ids(_take(resumed, total - k1))
    assert head + tail == reference
    assert state["streaming"]["epoch"] == (1 if stop == "epoch+2" else 0)
    _close(resumed)
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({**state, "version": 0})


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass


@contextmanager
def _http_server(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``directory`` on 127.0.0.1 (a free port) for the duration of the block; record requests."""
    requests: list[str] = []

    class Handler(_QuietHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

    handler = functools.partial(Handler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_http_remote_downloads_into_the_cache_and_matches_local_reads(shards: Path, tmp_path: Path) -> None:
    local_cfg = {"train": [str(shards / "train")], "seed": 3}
    local, _ = _loaders(local_cfg, 2)
    expected = _take(local, 12)
    _close(local)
    with _http_server(shards) as (url, requests):
        cache = str(tmp_path / "cache")
        cfg = {"train": [f"{url}/train"], "cache_dir": cache, "seed": 3, "validate_hash": "sha1"}
        remote, _ = _loaders(cfg, 2)
        got = _take(remote, 12)
        _close(remote)
    assert "/train/index.json" in requests and any(r.startswith("/train/shard.") for r in requests)
    for a, b in zip(expected, got):
        for key in a:
            assert a[key].equal(b[key]), key
    cached = DataConfig.from_dict(cfg).local_dir(StreamSpec(f"{url}/train"))
    assert (Path(cached) / "index.json").is_file()
    # The server is gone: a new loader on the same cache serves the rows it already holds.
    again, _ = _loaders(cfg, 2)
    assert _ids(_take(again, 2)) == _ids(got[:2])
    _close(again)


def test_local_directory_remote_is_copied_into_the_cache(shards: Path, tmp_path: Path) -> None:
    cache = tmp_path / "node-cache"
    cfg = {"train": [{"path": str(shards / "train"), "local": str(cache)}], "shuffle": False}
    train, _ = _loaders(cfg, 2)
    assert _ids(_take(train, 3)) == list(range(6))
    assert (cache / "index.json").is_file() and any(p.name.startswith("shard.") for p in cache.iterdir())
    _close(train)


def test_mixture_weights_and_config_sources(shards: Path) -> None:
    @dataclass
    class Section:  # the shape of the training config's data section
        path: str
        num_workers: int = 0

    cfg = DataConfig.from_any(Section(str(shards)))
    assert [s.path for s in cfg.train] == [f"{shards}/train"]
    assert [s.path for s in cfg.valid] == [f"{shards}/val"]
    mix = {"train": [{"path": str(shards / "train"), "proportion": 0.75},
                     {"path": str(shards / "val"), "proportion": 0.25}], "epoch_size": 64}
    train, _ = _loaders(mix, 4)
    assert len(train) == 16
    _close(train)
    with pytest.raises(ValueError, match="unknown data config keys"):
        DataConfig.from_dict({"train": ["x"], "shuffel": True})
    with pytest.raises(FileNotFoundError, match=r"no index\.json"):
        build_loaders({"train": [str(shards)]}, micro_batch_size=2, seq_len=SEQ, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="seq_len=8 needs 9"):
        loader, _ = _loaders({"train": [str(shards / "train")]}, 2, seq_len=8)
        try:
            next(iter(loader))
        finally:
            _close(loader)


def test_launch_numbers_are_checked_before_streaming_sees_them() -> None:
    from streaming.base.world import World

    with pytest.raises(ValueError, match="not a multiple"):
        set_streaming_env(rank=0, world_size=6, local_rank=0, local_world_size=4)
    with pytest.raises(ValueError, match="numbered node by node"):
        set_streaming_env(rank=5, world_size=8, local_rank=0, local_world_size=4)
    physical = World(num_nodes=2, ranks_per_node=4, workers_per_rank=1, worker=5)
    dp = data_parallel_world(physical, dp_rank=3, dp_size=4)  # e.g. TP=2: two replicas per node
    assert (dp.num_nodes, dp.ranks_per_node, dp.node, dp.rank_of_node) == (2, 2, 1, 1)
    with pytest.raises(ValueError, match="does not divide"):
        data_parallel_world(physical, dp_rank=0, dp_size=3)
