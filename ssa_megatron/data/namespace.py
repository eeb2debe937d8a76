"""One streaming shared-memory namespace (and one cache) per run, so runs on one node never meet.

Why parallel runs on one node crashed or mixed their samples
-------------------------------------------------------------
mosaicml-streaming (0.13) keeps the shared state of a ``StreamingDataset`` in the node-global
POSIX shared-memory namespace (``/dev/shm``) under ``{prefix:06}_{what}``, and its lock files
in the temp directory as ``{prefix:06}_{what}_filelock``. ``what`` is ``locals`` (the stream
directories), ``barrier``, ``next_epoch``, ``cache_usage``, ``shard_states``,
``shard_access_times``, ``resume`` (a loaded state dict) and ``epoch_shape`` / ``epoch_data``
(the epoch's sample partition, written by the node's first rank and read by the others).
``streaming.base.shared.prefix.get_shm_prefix`` picks the prefix, and nothing ties it to a job:

- *every rank* scans prefixes 0, 1, ... on its own for the first one with no ``locals`` (and no
  other name or lock file); then the node's first rank creates ``{p}_locals`` and the other
  ranks attach to ``{p}_locals`` by the number *they* found, accepting it when it records the
  same stream directories and the same number.
- Two jobs whose first ranks scan before either registers pick the same prefix; the second
  ``create`` fails: ``FileExistsError: '/00000p_locals'`` at start-up.
- A rank that scanned before another job registered ``p`` finds ``p`` free while its own first
  rank, scanning a moment later, takes ``p + 1``. It then attaches to the *other job's*
  ``{p}_locals``; with the same ``data.path`` the directories match, so it is accepted, and
  from then on that rank shares the other job's barrier, epoch counter and sample partitions:
  it trains on samples drawn for another run, with no error. (For directories read in place,
  no remote, streaming allows two datasets over one directory on purpose, so nothing else
  notices.) Each run builds two datasets (train and validation), which widens the window.
- Datasets of one job are built one after another with barriers in between, so within a job
  every rank scans the same state: the race is only between jobs.

What this module does
---------------------
Every run gets its own namespace: streaming's names become ``{namespace}_{prefix:06}_{what}``
(shared memory and lock files alike), where ``namespace`` is ``ssa-<key hash>-n<node>-<gen>``.

- The *key* names the run's shared state on disk: the local cache directories it uses (remote
  streams, derived from ``checkpoint.dir`` or given as ``data.cache_dir``), else the run's
  ``data.cache_dir`` / ``<checkpoint.dir>/data_cache``, else (no checkpoint directory, nothing
  cached) a token of this job. ``gen`` is chosen once per job, so a process that outlives its
  loaders can never clean up (at exit) names that a later run of the same key uses.
- The node's first rank *claims* the key with an exclusive ``flock`` on ``<key>.owner`` in the
  shared-memory directory, which records who holds it. A second live run with the same key is
  refused on every rank with one line naming the holder (pid, host, start time, command) and the
  fix. The kernel drops the lock when its process dies, so a held lock always means a live owner.
- On claiming, whatever a dead owner of the key left (shared memory, streaming's lock files) is
  removed, and so are the leftovers of any other key whose owner is gone: a killed run (with
  its resource tracker, e.g. under SLURM or an OOM kill) neither blocks nor leaks into the next.
- Within a job all ranks agree on the namespace through two collectives at start-up (the
  token/generation from rank 0, and the first rank's claim result), so a refusal stops every
  rank instead of leaving some in a barrier.

streaming builds its names with ``streaming.base.shared.prefix._get_path``; :func:`install` wraps
that function and ``get_shm_prefix`` (in the modules that imported them) so that the prefix a
dataset receives carries its namespace and every later name of that dataset is built with it.
Datasets built outside :func:`Claim.active` (plain ``StreamingDataset``) keep streaming's names.

Within one job: a rank attaching before its leader sized the block
-----------------------------------------------------------------
Every rank of a node opens the dataset's shared scalars and arrays (``next_epoch``,
``cache_usage``, ...) the same way: create, and on ``FileExistsError`` wait 7 ms and attach.
Creating is two system calls (``shm_open``, then ``ftruncate``); a rank that attaches between
them finds an empty block and dies with ``ValueError: cannot mmap an empty file``, and its job
with it. On a loaded node (several jobs starting at once) the creator can be off the CPU for
longer than 7 ms. :func:`install` makes attaching wait until the creator has sized the block.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

NAME_PREFIX = "ssa-"
OWNER_SUFFIX = ".owner"
SHM_DIR = "/dev/shm"
# A claimer that finds the lock taken retries this long: a sweeper holds a dead key's lock for
# the few milliseconds it takes to remove its leftovers.
_BUSY_GRACE_S = 2.0

_ACTIVE: contextvars.ContextVar[str | None] = contextvars.ContextVar("ssa_streaming_namespace", default=None)


class NamespaceError(RuntimeError):
    """Another live run holds this run's streaming namespace, or its registration cannot be read."""


class NamespacedPrefix(int):
    """streaming's shared-memory prefix number, carrying the namespace its names are built in."""

    namespace: str

    def __new__(cls, value: int, namespace: str) -> NamespacedPrefix:
        obj = super().__new__(cls, value)
        obj.namespace = namespace
        return obj

    def __reduce__(self) -> tuple[Any, tuple[int, str]]:
        return NamespacedPrefix, (int(self), self.namespace)


def install() -> None:
    """Make streaming build its shared-memory and lock-file names inside the active namespace, and
    make its attaching ranks wait for a block their leader has created but not yet sized."""
    import streaming.base.dataset as sdataset
    import streaming.base.shared as sshared
    import streaming.base.shared.prefix as sprefix

    if getattr(sprefix._get_path, "ssa_namespaced", False):
        return
    _attach_when_sized()
    plain_get_path = sprefix._get_path
    plain_get_shm_prefix = sprefix.get_shm_prefix

    def _get_path(prefix_int: int, name: str) -> str:
        namespace = getattr(prefix_int, "namespace", None) or _ACTIVE.get()
        base = plain_get_path(int(prefix_int), name)
        return f"{namespace}_{base}" if namespace else base

    def get_shm_prefix(streams_local: list[str], streams_remote: list[str | None], world: Any,
                       retry: int = 100) -> tuple[int, Any]:
        namespace = _ACTIVE.get()
        prefix, shm = plain_get_shm_prefix(streams_local, streams_remote, world, retry)
        if namespace is None:
            return prefix, shm
        _retain(namespace)
        return NamespacedPrefix(prefix, namespace), shm

    _get_path.ssa_namespaced = True  # type: ignore[attr-defined]
    for module in (sprefix, sshared, sdataset):
        module._get_path = _get_path  # type: ignore[attr-defined]
        module.get_shm_prefix = get_shm_prefix  # type: ignore[attr-defined]


# How long an attaching rank waits for the creator to size a block: longer than any scheduling
# delay between its two system calls, short enough that a block left empty by a crash still fails.
_SIZING_GRACE_S = 10.0


def _attach_when_sized() -> None:
    """Make streaming's attach to a just-created, not yet sized, shared-memory block wait and retry."""
    from multiprocessing.shared_memory import SharedMemory as BuiltinSharedMemory

    import streaming.base.shared.memory as smemory

    class SizedSharedMemory(BuiltinSharedMemory):
        def __init__(self, name: str | None = None, create: bool = False, size: int = 0) -> None:
            deadline = time.monotonic() + _SIZING_GRACE_S
            while True:
                try:
                    super().__init__(name, create, size)
                    return
                except ValueError:  # "cannot mmap an empty file": created, not sized yet
                    fd = getattr(self, "_fd", -1)
                    if fd >= 0:
                        os.close(fd)
                        self._fd = -1
                    if create or time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)

    smemory.BuiltinSharedMemory = SizedSharedMemory  # type: ignore[misc]


# --- claims -------------------------------------------------------------------------------------


@dataclass
class _Held:
    fd: int
    # Datasets built in each namespace (generation) of this key that are not closed yet.
    open_datasets: dict[str, int] = field(default_factory=dict)


_HELD: dict[str, _Held] = {}
_RELEASED: set[str] = set()


def registry_dir() -> str:
    """Where claims live: beside the shared memory they guard (node-local), else the temp dir."""
    return SHM_DIR if os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK) else tempfile.gettempdir()


def _owner_path(key: str) -> str:
    return os.path.join(registry_dir(), key + OWNER_SUFFIX)


def _key_of(namespace: str) -> str:
    return namespace.rsplit("-", 1)[0]


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "a process that has not written its details yet"
    command = str(owner.get("command", ""))[:160]
    return (f"pid {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')}, "
            f"{command!r})")


def _lock(key: str, identity: str) -> int:
    """Exclusive, non-blocking flock of the key's owner file; NamespaceError when a live run holds it."""
    path = _owner_path(key)
    deadline = time.monotonic() + _BUSY_GRACE_S
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            uid = os.stat(path).st_uid
            raise NamespaceError(
                f"the streaming namespace of {identity} is registered by another user (uid {uid}) in {path}; "
                "give this run its own checkpoint.dir or data.cache_dir, or have that user remove the file"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            owner = _read_owner(fd)
            os.close(fd)
            if time.monotonic() < deadline and not _alive(owner.get("pid")):
                time.sleep(0.05)  # being swept, or its holder is just writing its details
                continue
            raise NamespaceError(
                f"{identity} is in use by another live run: {_describe(owner)} holds its data loader "
                f"namespace ({path}); give this run its own checkpoint.dir (or data.cache_dir), or stop "
                f"that run (kill {owner.get('pid', '<pid>')}) first"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # a sweeper removed the file between our open and our lock: start over


def _remove_leftovers(key: str, owner: dict[str, Any] | None = None) -> int:
    """Remove the shared memory and streaming lock files of every generation of ``key``; returns the count."""
    removed = 0
    stem = key + "-"
    for directory in {SHM_DIR if os.path.isdir(SHM_DIR) else None, tempfile.gettempdir()} - {None}:
        try:
            names = os.listdir(directory)  # type: ignore[arg-type]
        except OSError:
            continue
        for name in names:
            if name.startswith(stem):
                with contextlib.suppress(FileNotFoundError, PermissionError, IsADirectoryError):
                    os.unlink(os.path.join(directory, name))  # type: ignore[arg-type]
                    removed += 1
    if not os.path.isdir(SHM_DIR):
        # No listable shared-memory directory: unlink the names streaming would have used.
        from multiprocessing import shared_memory

        from streaming.base.constant import SHM_TO_CLEAN

        for namespace in (owner or {}).get("namespaces", []):
            for prefix in range(64):
                for what in SHM_TO_CLEAN:
                    with contextlib.suppress(FileNotFoundError, PermissionError, OSError):
                        shm = shared_memory.SharedMemory(f"{namespace}_{prefix:06}_{what}")
                        shm.close()
                        shm.unlink()
                        removed += 1
    return removed


def sweep_dead_owners(*, at_exit: bool = False) -> list[str]:
    """Remove the leftovers of every namespace whose owner is gone; returns their keys."""
    swept = []
    directory = registry_dir()
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return swept
    for name in names:
        if not (name.startswith(NAME_PREFIX) and name.endswith(OWNER_SUFFIX)):
            continue
        key = name[: -len(OWNER_SUFFIX)]
        if key in _HELD or (key in _RELEASED and not at_exit):
            # Released by this process: its streaming objects unlink their own names at exit.
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # gone already, or another user's
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                continue
            _remove_leftovers(key, _read_owner(fd))
            os.unlink(path)
            swept.append(key)
        except OSError:
            pass  # held by a live run, or removed meanwhile
        finally:
            os.close(fd)
    return swept


def _claim(key: str, namespace: str, identity: str) -> None:
    """Hold ``key`` for this process (reentrant); clean what dead owners left; record who holds it."""
    held = _HELD.get(key)
    if held is None:
        fd = _lock(key, identity)
        owner = _read_owner(fd)
        _remove_leftovers(key, owner)
        held = _HELD[key] = _Held(fd)
        _RELEASED.discard(key)
        sweep_dead_owners()
    held.open_datasets.setdefault(namespace, 0)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "identity": identity,
        "command": " ".join(sys.argv),
        "namespaces": sorted(held.open_datasets),
    }
    data = json.dumps(record).encode()
    os.ftruncate(held.fd, 0)
    os.pwrite(held.fd, data, 0)


def _retain(namespace: str) -> None:
    held = _HELD.get(_key_of(namespace))
    if held is not None:
        held.open_datasets[namespace] = held.open_datasets.get(namespace, 0) + 1


def release(namespace: str | None) -> None:
    """One dataset of ``namespace`` was closed; the claim goes when none of its datasets is open.

    The owner file stays (unlocked): if this process dies before its exit handlers run, the next
    run's sweep finds it and removes what the process left.
    """
    if namespace is None:
        return
    key = _key_of(namespace)
    held = _HELD.get(key)
    if held is None:
        return
    if held.open_datasets.get(namespace, 0) > 0:
        held.open_datasets[namespace] -= 1
    if any(held.open_datasets.values()):
        return
    os.close(held.fd)
    del _HELD[key]
    _RELEASED.add(key)


def _release_all_at_exit() -> None:
    # Registered before streaming creates anything, so it runs after streaming's own exit
    # handlers (atexit is last-in, first-out): what they did not remove goes now.
    for key in list(_HELD):
        held = _HELD.pop(key)
        _remove_leftovers(key)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_owner_path(key))
        os.close(held.fd)
    if _RELEASED:
        sweep_dead_owners(at_exit=True)


atexit.register(_release_all_at_exit)


# --- one claim per run, agreed on by every rank --------------------------------------------------


@dataclass
class Claim:
    """The namespace a run's loaders are built in (same on every rank of a node)."""

    namespace: str
    identity: str

    @contextlib.contextmanager
    def active(self) -> Iterator[Claim]:
        """Datasets built inside use this namespace; the claim is dropped if none was built."""
        token = _ACTIVE.set(self.namespace)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            held = _HELD.get(_key_of(self.namespace))
            if held is not None and not held.open_datasets.get(self.namespace):
                held.open_datasets[self.namespace] = 1
                release(self.namespace)


def cache_identity(cfg: Any, default_cache_dir: str) -> str | None:
    """What the run's shared on-disk state is: the cache directories it uses, else its own
    ``cache_dir`` when that is not the shared default; None when it reads everything in place."""
    locals_ = sorted({os.path.realpath(d) for d in (cfg.local_dir(s) for s in [*cfg.train, *cfg.valid]) if d})
    if locals_:
        return "data cache " + ", ".join(locals_)
    cache = getattr(cfg, "cache_dir", None)
    if cache and os.path.realpath(cache) != os.path.realpath(default_cache_dir):
        return "data cache " + os.path.realpath(cache)
    return None


def _from_rank0(obj: Any) -> Any:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _first_error(error: str | None) -> str | None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        return next((e for e in errors if e), None)
    return error


def open_claim(identity: str | None, *, node: int, is_local_leader: bool) -> Claim:
    """Collective over the job: agree on the namespace, claim it on each node's first rank.

    ``identity`` is :func:`cache_identity` (same on every rank); None gives the job a namespace
    of its own. Raises :class:`NamespaceError` on every rank when a node's claim is refused.
    """
    install()
    token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    token, generation = _from_rank0((token, secrets.token_hex(3)))
    label = identity or "this job (no checkpoint.dir or data.cache_dir)"
    digest = hashlib.sha1((identity or f"job {token}").encode()).hexdigest()[:10]
    key = f"{NAME_PREFIX}{digest}-n{node}"
    namespace = f"{key}-{generation}"
    error = None
    if is_local_leader:
        try:
            _claim(key, namespace, label)
        except NamespaceError as err:
            error = str(err)
    error = _first_error(error)
    if error:
        raise NamespaceError(error)
    return Claim(namespace, label)
