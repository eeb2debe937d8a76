"""Where the training data comes from: the ``data`` config keys -> validated loader streams.

A *dataset root* is what ``tools/prepare_data.py`` writes: ``train/`` and ``val/`` MDS splits
below one directory or URI. ``data.path`` names one root; ``data.streams`` names several with
mosaicml-streaming's mixture weights (``proportion`` on all or none, or ``repeat`` / ``choose``);
``data.valid_streams`` picks the validation mixture (default: every stream's ``val/``, unweighted,
where it exists). Roots may be local directories or any URI streaming reads (``s3://``,
``gs://``, ``oci://``, ``azure://``, ``hf://``, ``sftp://``, ``dbfs:``) plus ``http(s)://``
(:mod:`ssa_megatron.data.http_remote`); remote shards are copied once per node into
``data.cache_dir``.

Credentials never appear in the config: streaming's clients take them from the environment or
the provider's own files (``AWS_ACCESS_KEY_ID`` / ``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``,
``OCI`` config, ...), and a URI that carries a user or password is refused, because the config
is printed at start-up and saved with every checkpoint.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from ssa_megatron.data.config import DEFAULT_CACHE_DIR, DataConfig, StreamSpec

# streaming 0.13's downloaders plus the http(s) one registered by this package.
REMOTE_SCHEMES = ("s3", "gs", "oci", "azure", "azure-dl", "hf", "sftp", "dbfs", "http", "https")
# streaming.base.hashing.get_hashes() and streaming.base.shuffle.algos (checked by a test), kept
# here so that validating a config does not import streaming (and torch).
HASH_ALGOS = (
    "blake2b", "blake2s", "md5", "sha1", "sha224", "sha256", "sha384", "sha512", "sha3_224",
    "sha3_256", "sha3_384", "sha3_512", "xxh128", "xxh32", "xxh3_128", "xxh3_64", "xxh64",
)
SHUFFLE_ALGOS = ("py1br", "py1e", "py1s", "py2s", "naive")
STREAM_KEYS = ("path", "proportion", "repeat", "choose", "cache_dir")
# The hash "auto" checks on remote streams; tools/prepare_data.py writes sha1 and xxh64.
AUTO_HASH = "xxh64"
TRAIN_SPLIT, VALID_SPLIT = "train", "val"


class SourceError(ValueError):
    """A data source key is wrong; the message names the key, the value and the fix."""


def is_remote(path: str) -> bool:
    """True for a URI streaming downloads from; False for a local directory (``file://`` too)."""
    scheme = urllib.parse.urlparse(path).scheme
    return bool(scheme) and scheme != "file" and not os.path.isabs(path) and len(scheme) > 1


def local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def display(uri: str) -> str:
    """``uri`` for messages: a query string (pre-signed URLs carry signatures there) is cut."""
    parts = urllib.parse.urlsplit(uri)
    if parts.query:
        return urllib.parse.urlunsplit(parts._replace(query="...", fragment=""))
    return uri


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _check_uri(where: str, uri: Any) -> None:
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(f"{where}={uri!r} must be a non-empty path or URI (s3://bucket/dataset, /data/set)")
    if not is_remote(uri):
        return
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme
    if scheme not in REMOTE_SCHEMES:
        raise SourceError(
            f"{where}={display(uri)!r}: scheme {scheme}:// is not readable; use a local directory or one of "
            + ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
        )
    if parts.username or parts.password:
        raise SourceError(
            f"{where} carries credentials in the URI (user:password@); remove them and give them through the "
            "environment or the provider's config files (the config is printed and saved with checkpoints)"
        )
    if scheme not in ("dbfs",) and not parts.netloc:
        raise SourceError(f"{where}={display(uri)!r} names no bucket or host; e.g. {scheme}://bucket/dataset")


def _check_streams(key: str, streams: Any) -> None:
    if not isinstance(streams, list):
        raise SourceError(f"data.{key} must be a list of {{path, proportion | repeat | choose, cache_dir}}")
    kinds = []
    for i, entry in enumerate(streams):
        where = f"data.{key}[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise SourceError(f"{where}={entry!r} needs a 'path' (a dataset root with train/ and val/)")
        unknown = sorted(set(entry) - set(STREAM_KEYS))
        if unknown:
            raise SourceError(f"{where} has unknown keys {unknown}; allowed: {', '.join(STREAM_KEYS)}")
        _check_uri(f"{where}.path", entry["path"])
        weights = [k for k in ("proportion", "repeat", "choose") if entry.get(k) is not None]
        if len(weights) > 1:
            raise SourceError(
                f"{where} sets {' and '.join(weights)}; give at most one of proportion, repeat, choose"
            )
        for name in weights:
            value = entry[name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
            if name == "choose":
                ok = ok and isinstance(value, int)
            if not ok:
                kind = "a positive integer" if name == "choose" else "a positive number"
                raise SourceError(f"{where}.{name}={value!r} must be {kind}")
        kinds.append(weights[0] if weights else None)
        cache = entry.get("cache_dir")
        if cache is not None and (not isinstance(cache, str) or not cache):
            raise SourceError(f"{where}.cache_dir={cache!r} must be a non-empty directory path")
    if "proportion" in kinds and any(k != "proportion" for k in kinds):
        raise SourceError(
            f"data.{key}: proportion is set on some streams only; set it on every stream, or use repeat / "
            "choose (absolute weights) instead"
        )
    paths = [e["path"] if isinstance(e, dict) else e for e in streams]
    dupes = sorted({p for p in paths if paths.count(p) > 1})
    if dupes:
        raise SourceError(f"data.{key} lists {dupes} more than once; give each root once (weight it instead)")


def validate_section(d: Any) -> None:
    """Check the ``data`` section's source keys (no I/O); raise :class:`SourceError` naming the key."""
    if d.path and d.streams:
        raise SourceError("data.path and data.streams are both set; give one dataset root in data.path or a "
                          "mixture in data.streams")
    if d.path:
        _check_uri("data.path", d.path)
        if d.build_demo and is_remote(d.path):
            raise SourceError(f"data.build_demo=true needs a local data.path, not {display(d.path)!r}; "
                              "build the demo set locally and upload it with tools/prepare_data.py --output")
    if d.streams:
        _check_streams("streams", d.streams)
        if d.build_demo:
            raise SourceError("data.build_demo=true builds one local dataset in data.path; it cannot be used "
                              "with data.streams")
    if d.valid_streams:
        _check_streams("valid_streams", d.valid_streams)
    if d.cache_dir is not None and not d.cache_dir:
        raise SourceError("data.cache_dir is empty; give a node-local directory or leave it unset")
    if d.cache_dir is not None and is_remote(d.cache_dir):
        raise SourceError(
            f"data.cache_dir={display(d.cache_dir)!r} must be a node-local directory, not a URI"
        )
    if d.validate_hash not in ("auto", "none", *HASH_ALGOS):
        raise SourceError(f"data.validate_hash={d.validate_hash!r}; choose auto, none or one of "
                          + ", ".join(HASH_ALGOS))
    if d.download_retry < 1:
        raise SourceError(f"data.download_retry={d.download_retry} must be >= 1 (download attempts per file)")
    if not d.download_timeout > 0:
        raise SourceError(f"data.download_timeout={d.download_timeout} must be a positive number of seconds")
    if d.predownload is not None and d.predownload < 1:
        raise SourceError(f"data.predownload={d.predownload} must be >= 1 (samples fetched ahead) or unset")
    if d.shuffle_algo not in SHUFFLE_ALGOS:
        raise SourceError(f"data.shuffle_algo={d.shuffle_algo!r}; choose one of {', '.join(SHUFFLE_ALGOS)}")
    if d.num_canonical_nodes is not None and d.num_canonical_nodes < 1:
        raise SourceError(f"data.num_canonical_nodes={d.num_canonical_nodes} must be >= 1 or unset")


def default_cache_dir(cache_dir: str | None, run_dir: str | None) -> str:
    """``data.cache_dir``, else ``<run_dir>/data_cache``, else the user cache directory."""
    if cache_dir:
        return cache_dir
    if run_dir:
        return os.path.join(run_dir, "data_cache")
    return DEFAULT_CACHE_DIR


def _entries(streams: list[Any]) -> list[dict[str, Any]]:
    return [{"path": e} if isinstance(e, str) else dict(e) for e in streams]


def _spec(entry: dict[str, Any], split: str, weighted: bool = True) -> StreamSpec:
    root = entry["path"]
    path = join(root, split) if is_remote(root) else os.path.join(local_path(root), split)
    local = os.path.join(entry["cache_dir"], split) if entry.get("cache_dir") else None
    return StreamSpec(
        path,
        proportion=entry.get("proportion") if weighted else None,
        repeat=entry.get("repeat") if weighted else None,
        choose=entry.get("choose") if weighted else None,
        local=local,
    )


def source_entries(d: Any) -> list[dict[str, Any]]:
    """The train roots of a data section: ``data.streams``, else ``data.path`` as one stream."""
    return _entries(d.streams) if d.streams else [{"path": d.path}]


def data_config(
    d: Any,
    *,
    seed: int,
    run_dir: str | None = None,
    has_split: Any = None,
) -> DataConfig:
    """The loader config of a ``data`` section.

    ``has_split(spec) -> bool`` says whether a validation split exists (default: a local index.json
    beside the path, or a cached copy of a remote one, which the preflight writes on every node).
    """
    cfg = DataConfig(
        train=[_spec(e, TRAIN_SPLIT) for e in source_entries(d)],
        cache_dir=default_cache_dir(d.cache_dir, run_dir),
        shuffle=d.shuffle,
        seed=d.shuffle_seed if d.shuffle_seed is not None else seed,
        shuffle_algo=d.shuffle_algo,
        num_canonical_nodes=d.num_canonical_nodes,
        num_workers=d.num_workers,
        predownload=d.predownload,
        download_timeout=float(d.download_timeout),
        download_retry=d.download_retry,
        validate_hash=d.validate_hash,
    )
    check = has_split or (lambda spec: os.path.isfile(os.path.join(index_dir(cfg, spec), "index.json")))
    if d.valid_streams:
        cfg.valid = [_spec(e, VALID_SPLIT) for e in _entries(d.valid_streams)]
    else:
        candidates = [_spec(e, VALID_SPLIT, weighted=False) for e in source_entries(d)]
        cfg.valid = [s for s in candidates if check(s)]
    return cfg


def index_dir(cfg: DataConfig, spec: StreamSpec) -> str:
    """The local directory whose index.json streaming reads for ``spec`` (the cache for remote streams)."""
    return cfg.local_dir(spec) or spec.path


def resolve_hash(cfg: DataConfig, spec: StreamSpec) -> str | None:
    """The hash streaming checks for ``spec``'s shards ("auto": xxh64 when remote)."""
    if cfg.validate_hash in (None, "none"):
        return None
    if cfg.validate_hash == "auto":
        return AUTO_HASH if spec.is_remote() else None
    return cfg.validate_hash
