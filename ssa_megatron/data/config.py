"""What the loaders need to know: the streams of each split and how to read them.

``DataConfig.from_any`` accepts this dataclass, a plain dict (YAML), or any object with a
``path`` attribute naming a directory with ``train/`` and ``val/`` MDS splits (the
training config's ``data`` section).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "ssa_megatron", "streams")


@dataclass
class StreamSpec:
    """One MDS directory: a local path, or a remote URI (s3://, gs://, https://, ...) cached locally.

    ``proportion`` / ``repeat`` / ``choose`` are streaming's mixture weights (set at most one
    kind across the streams of a split). ``local`` overrides the cache directory; giving a
    ``local`` for a local ``path`` makes that path act as a remote that is copied into the cache.
    """

    path: str
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    local: str | None = None

    def is_remote(self) -> bool:
        scheme = urllib.parse.urlparse(self.path).scheme
        # A one-letter "scheme" is a Windows drive; file:// is a local directory.
        return len(scheme) > 1 and scheme != "file" and not os.path.isabs(self.path)


@dataclass
class DataConfig:
    train: list[StreamSpec]
    valid: list[StreamSpec] = field(default_factory=list)
    # Local cache of remote streams; each stream gets its own subdirectory (one per node).
    cache_dir: str = DEFAULT_CACHE_DIR
    shuffle: bool = True
    seed: int = 1234
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    # Fixes the global sample order independently of the node count (saved with the loader state).
    num_canonical_nodes: int | None = None
    num_workers: int = 0
    predownload: int | None = None
    cache_limit: str | None = None
    download_timeout: float = 120.0
    download_retry: int = 2
    # "auto": xxh64 for remote streams (prepare_data writes it), nothing for local ones; "none"/None: off.
    validate_hash: str | None = "auto"
    epoch_size: int | None = None

    @classmethod
    def from_any(cls, obj: Any) -> DataConfig:
        if isinstance(obj, DataConfig):
            return obj
        if isinstance(obj, dict):
            return cls.from_dict(obj)
        if hasattr(obj, "path"):
            root = str(obj.path)
            if not root:
                raise ValueError(
                    "data.path is empty; set it to the directory holding train/ and val/ MDS splits"
                )
            kwargs: dict[str, Any] = {"train": [StreamSpec(_join(root, "train"))]}
            valid = _join(root, "val")
            if not os.path.isdir(root) or os.path.isdir(valid):
                kwargs["valid"] = [StreamSpec(valid)]
            for name in ("num_workers", "cache_dir", "shuffle", "seed"):
                if hasattr(obj, name) and getattr(obj, name) is not None:
                    kwargs[name] = getattr(obj, name)
            return cls(**kwargs)
        raise TypeError(f"cannot build a DataConfig from {type(obj).__name__}; pass a dict or DataConfig")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DataConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; known keys: {sorted(known)}")
        values = dict(raw)
        for split in ("train", "valid"):
            values[split] = [_stream(s, split) for s in values.get(split, [])]
        if not values.get("train"):
            raise ValueError("data config needs at least one train stream (train: [{path: ...}])")
        return cls(**values)

    def local_dir(self, spec: StreamSpec) -> str | None:
        """Where a stream's shards live on this node (None: read in place)."""
        if spec.local:
            return spec.local
        if spec.is_remote():
            key = hashlib.sha1(spec.path.rstrip("/").encode()).hexdigest()[:16]
            return str(Path(self.cache_dir) / key)
        return None


def _join(root: str, split: str) -> str:
    return root.rstrip("/") + "/" + split


def _stream(value: Any, split: str) -> StreamSpec:
    if isinstance(value, StreamSpec):
        return value
    if isinstance(value, str):
        return StreamSpec(value)
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(StreamSpec)}
        unknown = sorted(set(value) - known)
        if unknown or "path" not in value:
            allowed = sorted(known - {"path"})
            raise ValueError(f"bad {split} stream {value!r}: needs 'path', may have {allowed}")
        return StreamSpec(**value)
    raise TypeError(f"a {split} stream must be a path or a mapping, got {value!r}")
