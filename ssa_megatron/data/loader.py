"""Data-parallel streaming loaders over packed MDS rows, with exact resumption.

How ranks get their batches
---------------------------
Every rank reads its own batch; nothing is broadcast. All ranks of one model replica (its
tensor-, context- and pipeline-parallel ranks) read with the replica's data-parallel rank,
so they see identical batches; different data-parallel ranks see disjoint samples. A
context-parallel rank slices its chunk from the full batch (see ``context_parallel.py``);
middle pipeline stages may simply not use theirs. Reading a row from the node-local
cache is cheap next to a training step, and it avoids a broadcast and a code path that
only some ranks run. (Shards are downloaded once per node, not per rank.)

streaming's own ``replication`` only groups *adjacent* ranks, and pipeline stages are not
adjacent in Megatron's rank order. So each rank builds the dataset with its real
``RANK``/``LOCAL_RANK`` (streaming uses them for the node's shared cache, shared memory and
barriers, which must match the physical layout), and :class:`ReplicaStreamingDataset` then
partitions the epoch over a *data-parallel* world ``(dp_rank, dp_size)`` instead. Because
streaming shares epoch-level work between the processes of a node through shared-memory
barriers, **every rank of every node must iterate its loader** (same number of epochs,
same number of batches) — this is why TP ranks > 0 read too.

Launchers
---------
Pass ``launch=`` (``ssa_megatron.training.launch.detect_launch()``) to :func:`build_loaders`;
it is required in multi-process runs. :func:`ssa_megatron.data.streaming_env.set_streaming_env`
then exports the four numbers under the names streaming reads, so runs under torchrun and
under the DeepSpeed launcher (which sets ``LOCAL_SIZE``, not ``LOCAL_WORLD_SIZE``) look the
same to streaming.

Resumption
----------
``state_dict()`` is the same on every rank; save it with each checkpoint and call
``load_state_dict()`` on every rank before iterating. The resumed run then consumes
exactly the samples an uninterrupted run would have (the concatenated sample sequence of
run + resume equals the uninterrupted one). The state records streaming's epoch, the
global sample offset in it, ``num_canonical_nodes`` and the shuffle seed.

Elastic resumption on a different number of nodes / data-parallel ranks: the global
order of an epoch is fixed by ``num_canonical_nodes`` (taken from the state; set it in
the data config to pin it from the first run), and the state counts *global* samples, so
the resumed run skips exactly the samples already consumed. With the same global batch
size (``micro_batch_size x dp_size``) each later step gets the same set of samples as the
uninterrupted run, only split differently over the ranks (tested: 2 replicas -> 1 rank).
streaming needs the new number of data-parallel "nodes" to divide ``num_canonical_nodes``
or be a multiple of it. The loader does not rescale anything else: a changed global batch
size changes which samples share a step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.world import World
from torch.utils.data import DataLoader

from ssa_megatron.data.batch import rows_to_batch
from ssa_megatron.data.config import DEFAULT_CACHE_DIR, DataConfig, StreamSpec
from ssa_megatron.data.http_remote import register_http_remote
from ssa_megatron.data.namespace import NamespaceError, cache_identity, open_claim
from ssa_megatron.data.namespace import release as release_namespace
from ssa_megatron.data.sources import resolve_hash
from ssa_megatron.data.streaming_env import LaunchLike, apply_launch

register_http_remote()

STATE_VERSION = 1


def data_parallel_world(physical: World, dp_rank: int, dp_size: int) -> World:
    """streaming's view of the run when only the data-parallel position decides the samples.

    Grouping data-parallel ranks into as many "nodes" as there are physical nodes keeps
    each physical node reading mostly its own shards (ranks are numbered node by node and
    the data-parallel rank grows with the global rank in Megatron's order).
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside dp_size={dp_size}")
    if physical.num_ranks % dp_size:
        raise ValueError(f"dp_size={dp_size} does not divide the world size {physical.num_ranks}")
    nodes = physical.num_nodes if dp_size % physical.num_nodes == 0 else 1
    per_node = dp_size // nodes
    return World(num_nodes=nodes, ranks_per_node=per_node, workers_per_rank=1, worker=dp_rank)


class DataError(ValueError):
    """A shard or row is damaged or unreadable; the message names the shard file (and row)."""


def _shard_name(stream: Stream, shard: Any) -> str:
    """Where a shard comes from: the remote URI when it is downloaded, else the local file."""
    raw, zipped = shard.file_pairs[0]
    basename = (zipped or raw).basename
    root = stream.remote if stream.remote is not None else stream.local
    return os.path.join(root, stream.split or "", basename) if "://" not in root else (
        root.rstrip("/") + "/" + (f"{stream.split}/" if stream.split else "") + basename)


def check_offset_table(filename: str, num_samples: int) -> None:
    """An MDS shard starts with its row count and ``n + 1`` ascending uint32 offsets ending at the file size.

    Checked when a shard becomes local, so a damaged table is named before any of its rows is drawn.
    """
    size = os.path.getsize(filename)
    with open(filename, "rb") as fh:
        head = fh.read(4 + 4 * (num_samples + 1))
    if len(head) < 4 + 4 * (num_samples + 1):
        raise DataError(f"shard {filename} is truncated ({size} bytes): its offset table is incomplete")
    count = int(np.frombuffer(head[:4], np.uint32)[0])
    offsets = np.frombuffer(head[4:], np.uint32).astype(np.int64)
    if count != num_samples:
        raise DataError(f"shard {filename} says it holds {count} rows, its index says {num_samples}")
    # The shard's column config sits between the table and the first row, so offsets[0] >= the table end.
    bad = np.flatnonzero((np.diff(offsets) < 0) | (offsets[1:] > size))
    if offsets[0] < len(head) or bad.size or offsets[-1] != size:
        row = int(bad[0]) if bad.size else (0 if offsets[0] < len(head) else num_samples - 1)
        raise DataError(f"shard {filename} has a damaged offset table at row {row} (offsets must ascend from "
                        f"the table's end to the file size {size}); re-create or re-download the shard")


class ReplicaStreamingDataset(StreamingDataset):
    """A StreamingDataset whose samples depend only on the data-parallel rank (see module doc).

    It also turns streaming's ``Background thread failed`` into the error that made the download
    thread fail, naming the shard (a hash mismatch, a missing object), and names shard and row when
    a row cannot be decoded.
    """

    def __init__(self, *, dp_rank: int, dp_size: int, **kwargs: Any) -> None:
        super().__init__(replication=None, **kwargs)
        self._parallel_rank_world = data_parallel_world(self._unique_rank_world, dp_rank, dp_size)
        self.length = math.ceil(self.epoch_size / dp_size)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._data_error: Exception | None = None
        self._checked_shards: set[int] = set()

    def _shard_label(self, shard_id: int) -> str:
        return _shard_name(self.streams[self.stream_per_shard[shard_id]], self.shards[shard_id])

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        if self._data_error is not None:
            raise self._data_error
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            # streaming leaves a failed shard PREPARING, and a rank waiting for it (blocking) would
            # wait forever: hand it back, so the waiter retries and meets the error itself.
            if self._shard_states[shard_id] == _ShardState.PREPARING:
                self._shard_states[shard_id] = _ShardState.REMOTE
            self._record(shard_id, err)
        try:
            self._verify(shard_id)
        except DataError as err:
            self._data_error = err
            raise

    def _record(self, shard_id: int, err: Exception) -> None:
        """Keep the first data error (the main thread raises it) and raise it, naming the shard."""
        if isinstance(err, DataError):
            self._data_error = self._data_error or err
            raise err
        message = str(err)
        if "Checksum failure" in message:
            message = "hash mismatch (the shard is corrupted); re-write or re-upload it"
            self._drop_cached(shard_id)
        error = DataError(f"shard {self._shard_label(shard_id)}: {type(err).__name__}: {message}")
        self._data_error = self._data_error or error
        raise error from err

    def _prepare_thread(self, it: Any) -> None:
        self._run_counted(super()._prepare_thread, it)

    def _ready_thread(self, it: Any) -> None:
        self._run_counted(super()._ready_thread, it)

    def _run_counted(self, body: Callable[[Any], None], it: Any) -> None:
        """Run a download/ready thread so that it counts as exited even when it fails.

        streaming ends an epoch with ``it.exit()``, which waits until two of the download thread, the
        ready thread and the yield loop have called ``it.on_exit()``; a thread that raises skips that
        call. When both threads meet a shard error (the ready thread retries a shard the download thread
        handed back, see ``prepare_shard``), the wait never ended and the run hung instead of exiting.
        """
        try:
            body(it)
        except BaseException:
            self._event.set()  # the other thread and the yield loop stop at their next check
            it.on_exit()
            raise

    def on_exception(self, future: Any) -> None:
        """A download thread failed: stop the others; the main thread raises the recorded error.

        streaming re-raises it inside the future's callback, which only prints a traceback.
        """
        error = future.exception()
        if error is None:
            return
        self._event.set()
        if not isinstance(error, DataError):
            raise error

    def _stop_threads(self) -> None:
        """The main thread gives up on the epoch: its download and ready threads stop at their next check."""
        event = getattr(self, "_event", None)  # streaming creates it on the first iteration
        if event is not None:
            event.set()

    def _verify(self, shard_id: int) -> None:
        """Check a local shard's offset table once per process (before its first row is read)."""
        if shard_id in self._checked_shards:
            return
        stream = self.streams[self.stream_per_shard[shard_id]]
        shard = self.shards[shard_id]
        raw = os.path.join(stream.local, stream.split or "", shard.file_pairs[0][0].basename)
        if os.path.isfile(raw):
            check_offset_table(raw, shard.samples)
            self._checked_shards.add(shard_id)

    def _drop_cached(self, shard_id: int) -> None:
        """Delete a downloaded copy that failed its hash, so the next run downloads it again."""
        stream = self.streams[self.stream_per_shard[shard_id]]
        if stream.remote is None:
            return  # the shard is read in place: never delete the source
        for pair in self.shards[shard_id].file_pairs:
            for info in pair:
                if info is not None:
                    path = os.path.join(stream.local, stream.split or "", info.basename)
                    if os.path.isfile(path):
                        os.remove(path)

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        if self._data_error is not None:
            raise self._data_error
        try:
            shard_id, _ = self.spanner[sample_id]
            self._verify(shard_id)
            return super().get_item(sample_id, retry)
        except DataError as err:
            self._data_error = err
            self._stop_threads()
            raise
        except Exception as err:
            self._stop_threads()
            if self._data_error is not None:
                raise self._data_error from None
            shard_id, row = self.spanner[sample_id]
            raise DataError(f"shard {self._shard_label(shard_id)}, row {row}: cannot be read "
                            f"({type(err).__name__}: {err})") from err

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from super().__iter__()
        except RuntimeError:
            if self._data_error is not None:
                raise self._data_error from None
            raise
        if self._data_error is not None:
            raise self._data_error


class PackedRowLoader:
    """Iterates batch dicts of one data-parallel rank; tracks what it consumed for checkpoints.

    ``infinite=True`` (training) runs epoch after epoch; otherwise one pass per ``iter()``
    (validation: the same rows in the same order every time when ``shuffle`` is off).
    """

    def __init__(
        self,
        dataset: ReplicaStreamingDataset,
        *,
        micro_batch_size: int,
        seq_len: int,
        num_workers: int,
        infinite: bool,
        with_row_ids: bool = False,
    ) -> None:
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.seq_len = seq_len
        self.infinite = infinite
        self.with_row_ids = with_row_ids
        self._loader = DataLoader(
            dataset,
            batch_size=micro_batch_size,
            num_workers=num_workers,
            collate_fn=partial(rows_to_batch, seq_len=seq_len),
            drop_last=True,
            persistent_workers=num_workers > 0,
        )
        # Batches yielded in the current epoch since it started or since load_state_dict.
        self._batches = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.dataset) // self.micro_batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            self._batches = 0
            for batch in self._loader:
                self._batches += 1
                if not self.with_row_ids:
                    batch.pop("row_ids")
                yield batch
            if not self.infinite:
                return

    def state_dict(self) -> dict[str, Any]:
        """Position in the epoch (global samples) + shuffle identity; identical on every rank."""
        consumed = self._batches * self.micro_batch_size * self.dataset.dp_size
        return {
            "version": STATE_VERSION,
            "streaming": self.dataset.state_dict(consumed, from_beginning=False),
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dataset.dp_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where ``state`` was taken; call on every rank before the next ``iter()``."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}; "
                             "it was saved by an incompatible ssa-megatron")
        self.dataset.load_state_dict(state["streaming"])
        self._batches = 0

    def close(self) -> None:
        """Release streaming's shared memory now (before building another loader on the same cache)."""
        self._loader = None  # type: ignore[assignment]
        release_namespace(getattr(getattr(self.dataset, "_shm_prefix_int", None), "namespace", None))
        del self.dataset


def _streams(cfg: DataConfig, specs: list[StreamSpec]) -> list[Stream]:
    streams = []
    for spec in specs:
        local = cfg.local_dir(spec)
        if local is None:
            if not os.path.isfile(os.path.join(spec.path, "index.json")):
                raise FileNotFoundError(
                    f"stream {spec.path!r} has no index.json; point it at an MDS directory written by "
                    "tools/prepare_data.py (e.g. <out>/train)"
                )
            remote, local = None, spec.path
        else:
            remote = spec.path
        streams.append(Stream(
            remote=remote, local=local, proportion=spec.proportion, repeat=spec.repeat, choose=spec.choose,
            download_retry=cfg.download_retry, download_timeout=cfg.download_timeout,
            validate_hash=resolve_hash(cfg, spec),
        ))
    return streams


# DataConfig fields that streaming's dataset takes unchanged and under the same name.
_STREAMING_OPTIONS = (
    "shuffle_algo", "shuffle_block_size", "num_canonical_nodes", "predownload", "cache_limit",
)


def build_dataset(
    cfg: DataConfig,
    specs: list[StreamSpec],
    *,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    shuffle: bool,
) -> ReplicaStreamingDataset:
    return ReplicaStreamingDataset(
        dp_rank=dp_rank,
        dp_size=dp_size,
        streams=_streams(cfg, specs),
        batch_size=micro_batch_size,
        shuffle=shuffle,
        shuffle_seed=cfg.seed,
        epoch_size=cfg.epoch_size if shuffle else None,
        **{name: getattr(cfg, name) for name in _STREAMING_OPTIONS},
    )


def build_loaders(
    data_cfg: DataConfig | dict | Any,
    *,
    micro_batch_size: int,
    seq_len: int,
    dp_rank: int,
    dp_size: int,
    launch: LaunchLike | None = None,
    with_row_ids: bool = False,
) -> tuple[PackedRowLoader, PackedRowLoader | None]:
    """Train (infinite, shuffled) and validation (one pass, fixed order; None without streams) loaders.

    Call on every rank of the job, collectively (streaming synchronises the ranks while it
    sets up). ``launch`` carries rank/world/local numbers (e.g. ``training.launch.detect_launch()``);
    it may be omitted only in a single-process run.
    """
    cfg = DataConfig.from_any(data_cfg)
    if micro_batch_size < 1 or seq_len < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} and seq_len={seq_len} must be positive")
    if launch is not None:
        apply_launch(launch)
    elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Without the launch numbers streaming would guess the node layout from whatever the
        # launcher exported (wrong under DeepSpeed) and collide in shared memory.
        raise ValueError(
            "build_loaders needs launch=... in a multi-process run (e.g. "
            "launch=ssa_megatron.training.launch.detect_launch()) so streaming sees the node layout"
        )
    # Each run reads through its own streaming namespace (see namespace.py for why runs on one node
    # otherwise crash or silently share sample partitions); a second live run on the same cache is refused.
    node, local_rank = (launch.rank // launch.local_world_size, launch.local_rank) if launch else (0, 0)
    try:
        claim = open_claim(cache_identity(cfg, DEFAULT_CACHE_DIR), node=node, is_local_leader=local_rank == 0)
    except NamespaceError as err:
        raise DataError(str(err)) from None
    with claim.active():
        return _build_train_valid(cfg, micro_batch_size, seq_len, dp_rank, dp_size, with_row_ids)


def _build_train_valid(
    cfg: DataConfig, micro_batch_size: int, seq_len: int, dp_rank: int, dp_size: int, with_row_ids: bool
) -> tuple[PackedRowLoader, PackedRowLoader | None]:
    train = PackedRowLoader(
        build_dataset(cfg, cfg.train, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                      shuffle=cfg.shuffle),
        micro_batch_size=micro_batch_size, seq_len=seq_len, num_workers=cfg.num_workers, infinite=True,
        with_row_ids=with_row_ids,
    )
    valid = None
    if cfg.valid:
        valid = PackedRowLoader(
            build_dataset(cfg, cfg.valid, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                          shuffle=False),
            micro_batch_size=micro_batch_size, seq_len=seq_len, num_workers=0, infinite=False,
            with_row_ids=with_row_ids,
        )
    return train, valid
