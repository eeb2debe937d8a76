"""Start-up checks of the training data, before any model exists: one line per problem, naming the URI.

Rank 0 reads every stream's ``index.json`` once (and the first shard of each train stream, to
check its rows), then broadcasts the indexes; the first rank of every node writes them into its
node-local cache, where streaming looks first (so the cluster reads each index once, not once
per rank). A cached index that differs from the remote one means the dataset was re-written
since the cache was filled: that stream's cached files are dropped, never mixed with new ones.
Every rank then checks that its cache directory is writable.

What fails here, each as a :class:`PreflightError` with the URI and the fix: a missing split,
an unreachable endpoint, a bucket that does not exist, missing or refused credentials, shards
written for another sequence length or by another tokenizer (the fingerprint prepare_data
records beside the index), a hash the shards were not written with, a cache that is not
writable. Credentials are never read, printed or stored here; the clients find them.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ssa_megatron.data.config import DataConfig, StreamSpec
from ssa_megatron.data.sources import (
    VALID_SPLIT,
    data_config,
    display,
    index_dir,
    is_remote,
    join,
    local_path,
    resolve_hash,
)

INDEX = "index.json"


class PreflightError(ValueError):
    """The data cannot be read as configured; the message names the URI and the fix."""


@dataclass
class StreamIndex:
    path: str
    index: bytes | None  # None: the split does not exist (allowed for validation only)
    remote: bool


@dataclass
class PreflightResult:
    streams: list[StreamIndex] = field(default_factory=list)
    error: str | None = None


def _s3_client(timeout: float) -> Any:
    import boto3
    from botocore.config import Config

    # The client streaming builds (S3Downloader._create_s3_client): same endpoint variable, same
    # credential chain, so what passes here is what the loader will see.
    return boto3.Session().client(
        "s3",
        config=Config(connect_timeout=min(timeout, 10.0), read_timeout=timeout, retries={"max_attempts": 2}),
        endpoint_url=os.environ.get("S3_ENDPOINT_URL"),
    )


def _endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or "the AWS default endpoint"


def _read_s3(uri: str, timeout: float) -> bytes | None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    parts = urllib.parse.urlsplit(uri)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    if boto3.Session().get_credentials() is None:
        raise PreflightError(
            f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
            "or run where an instance role applies); a non-AWS store also needs S3_ENDPOINT_URL"
        )
    client = _s3_client(timeout)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except NoCredentialsError:
        raise PreflightError(f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                             "(or AWS_PROFILE)") from None
    except EndpointConnectionError:
        raise PreflightError(f"cannot reach the S3 endpoint {_endpoint()} for {uri}: check S3_ENDPOINT_URL "
                             "and the network (the store must be reachable from every node)") from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            raise PreflightError(f"bucket {bucket!r} does not exist at {_endpoint()} ({uri}): check the "
                                 "bucket name in data.path / data.streams") from None
        if code in ("NoSuchKey", "404"):
            return None
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            raise PreflightError(f"access to {uri} was refused ({code}): check the credentials in the "
                                 "environment (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket's "
                                 "permissions") from None
        raise PreflightError(f"cannot read {uri}: S3 error {code}: {err}") from None
    except BotoCoreError as err:
        raise PreflightError(f"cannot reach the S3 endpoint {_endpoint()} for {uri}: {err}; check "
                             "S3_ENDPOINT_URL and the network") from None


def _read_http(uri: str, timeout: float) -> bytes | None:
    try:
        with urllib.request.urlopen(uri, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise PreflightError(f"{display(uri)} answered HTTP {err.code} {err.reason}: check the URL and the "
                             "server's access rules") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        host = urllib.parse.urlsplit(uri).netloc
        raise PreflightError(f"cannot reach {host} for {display(uri)} ({reason}): check the URL in "
                             "data.path / data.streams and that the server runs") from None


def _read_other(uri: str, timeout: float) -> bytes | None:
    from streaming.base.storage.download import CloudDownloader

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, INDEX)
        try:
            CloudDownloader.direct_download(uri, local, timeout)
        except FileNotFoundError:
            return None
        except Exception as err:  # each provider's client raises its own types
            raise PreflightError(f"cannot read {display(uri)}: {type(err).__name__}: {err}; check the URI "
                                 "and the provider's credentials in the environment") from None
        with open(local, "rb") as fh:
            return fh.read()


def read_remote(uri: str, timeout: float) -> bytes | None:
    """The bytes of one remote file, or None when it does not exist; PreflightError when unreadable."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "s3":
        return _read_s3(uri, timeout)
    if scheme in ("http", "https"):
        return _read_http(uri, timeout)
    return _read_other(uri, timeout)


def _read_index(spec: StreamSpec, timeout: float) -> tuple[bytes | None, bool]:
    if spec.is_remote():
        return read_remote(spec.path.rstrip("/") + "/" + INDEX, timeout), True
    path = os.path.join(spec.path, INDEX)
    if not os.path.isfile(path):
        return None, bool(spec.local)
    with open(path, "rb") as fh:
        return fh.read(), bool(spec.local)


def _parse_index(spec: StreamSpec, raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise PreflightError(f"{display(spec.path)}/{INDEX} is not valid JSON (truncated or not an MDS "
                             "index); re-run tools/prepare_data.py for this split") from None
    if not isinstance(obj, dict) or obj.get("version") != 2 or not obj.get("shards"):
        raise PreflightError(f"{display(spec.path)}/{INDEX} is not an MDS index (version 2 with shards); "
                             "re-run tools/prepare_data.py for this split")
    for info in obj["shards"]:
        names = info.get("column_names") or []
        if info.get("format") != "mds" or "tokens" not in names or "doc_starts" not in names:
            raise PreflightError(f"{display(spec.path)} holds shards without the packed-row columns (tokens, "
                                 "doc_starts): write it with tools/prepare_data.py")
    return obj


def _check_hash(cfg: DataConfig, spec: StreamSpec, index: dict[str, Any]) -> None:
    algo = resolve_hash(cfg, spec)
    if algo is None:
        return
    for info in index["shards"]:
        data = info.get("zip_data") or info["raw_data"]
        have = sorted(data.get("hashes", {}))
        if algo not in have:
            fix = f"set data.validate_hash to one of {have}" if have else "set data.validate_hash: none"
            raise PreflightError(f"the shards of {display(spec.path)} were written without {algo} hashes "
                                 f"(data.validate_hash={cfg.validate_hash}); {fix}, or re-write them with "
                                 "tools/prepare_data.py")


def _first_row_tokens(cfg: DataConfig, spec: StreamSpec, index: dict[str, Any], timeout: float) -> int:
    """Tokens per row, read from the first row of the stream's first shard (fetched, hash-checked)."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json
    from streaming.base.hashing import get_hash

    info = index["shards"][0]
    stored = info.get("zip_data") or info["raw_data"]
    with tempfile.TemporaryDirectory() as tmp:
        if spec.is_remote():
            data = read_remote(spec.path.rstrip("/") + "/" + stored["basename"], timeout)
            if data is None:
                raise PreflightError(f"{display(spec.path)}/{stored['basename']} is listed in the index but "
                                     "missing: re-upload the split with tools/prepare_data.py --output")
        else:
            with open(os.path.join(spec.path, stored["basename"]), "rb") as fh:
                data = fh.read()
        algo = resolve_hash(cfg, spec)
        if algo and get_hash(algo, data) != stored["hashes"][algo]:
            raise PreflightError(f"shard {display(spec.path)}/{stored['basename']} fails its {algo} hash "
                                 "(corrupted): re-upload it with tools/prepare_data.py --output")
        if info.get("zip_data"):
            data = decompress(info["compression"], data)
        with open(os.path.join(tmp, info["raw_data"]["basename"]), "wb") as fh:
            fh.write(data)
        reader = reader_from_json(tmp, None, info)
        row = reader[0]
    return int(np.asarray(row["tokens"]).shape[0])


def _check_tokenizer(spec: StreamSpec, tokenizer: tuple[str, dict] | None, allow: bool,
                     timeout: float) -> None:
    """A remote split's recorded tokenizer fingerprint must match the run's (local splits are checked
    by ``tokenizer.check_and_record_run_tokenizer``)."""
    from ssa_megatron.data.tokenizer import FINGERPRINT_FILE, TokenizerMismatch, check_fingerprint

    if tokenizer is None or allow or not spec.is_remote():
        return
    raw = read_remote(spec.path.rstrip("/") + "/" + FINGERPRINT_FILE, timeout)
    if raw is None:
        return  # written before fingerprints were recorded: nothing to compare
    try:
        recorded = json.loads(raw)
    except ValueError:
        raise PreflightError(f"{display(spec.path)}/{FINGERPRINT_FILE} is not valid JSON; re-write the split "
                             "with tools/prepare_data.py") from None
    try:
        check_fingerprint(recorded, tokenizer[1], what=f"the shards in {display(spec.path)}",
                          tokenizer_path=tokenizer[0], override="data.allow_tokenizer_mismatch=true")
    except TokenizerMismatch as err:
        raise PreflightError(str(err)) from None


def check_remote(cfg: DataConfig, valid_candidates: list[StreamSpec], *, seq_len: int,
                 explicit_valid: bool, labels: dict[str, tuple[str, str]] | None = None,
                 tokenizer: tuple[str, dict] | None = None, allow_tokenizer_mismatch: bool = False,
                 ) -> PreflightResult:
    """Rank 0's part: read and check each stream's index (and one row per train stream).

    ``labels`` maps a split's path to (config key, dataset root) for messages; ``tokenizer`` is the
    run's (path, fingerprint), compared with what remote splits recorded.
    """
    labels = labels or {}
    result = PreflightResult()
    timeout = cfg.download_timeout
    for split, specs in (("train", cfg.train), (VALID_SPLIT, valid_candidates)):
        for spec in specs:
            raw, remote = _read_index(spec, timeout)
            if raw is None:
                if split == VALID_SPLIT and not explicit_valid:
                    result.streams.append(StreamIndex(spec.path, None, remote))
                    continue
                key, root = labels.get(spec.path, ("stream", spec.path.rstrip("/").rsplit("/", 1)[0]))
                raise PreflightError(
                    f"{key}={display(root)!r} has no {split}/{INDEX}: the {split} split is missing; point it "
                    "at a dataset root written by tools/prepare_data.py (train/ and val/ below it), e.g. "
                    f"tools/prepare_data.py --output {display(root)} (or data.build_demo=true for the demo "
                    "set)"
                )
            index = _parse_index(spec, raw)
            _check_hash(cfg, spec, index)
            _check_tokenizer(spec, tokenizer, allow_tokenizer_mismatch, timeout)
            if split == "train":
                try:
                    tokens = _first_row_tokens(cfg, spec, index, timeout)
                except PreflightError:
                    raise
                except Exception as err:
                    first = index["shards"][0].get("zip_data") or index["shards"][0]["raw_data"]
                    raise PreflightError(f"shard {display(spec.path)}/{first['basename']}, row 0 cannot be "
                                         f"read ({type(err).__name__}: {err}); re-write the split with "
                                         "tools/prepare_data.py") from None
                if tokens != seq_len + 1:
                    raise PreflightError(
                        f"rows of {display(spec.path)} hold {tokens} tokens (written with --seq-len "
                        f"{tokens - 1}) but data.seq_length={seq_len}: set data.seq_length {tokens - 1} or "
                        "re-run "
                        f"tools/prepare_data.py --seq-len {seq_len}"
                    )
            result.streams.append(StreamIndex(spec.path, raw, remote))
    return result


def _index_files(raw: bytes) -> list[str]:
    names = [INDEX]
    for info in json.loads(raw)["shards"]:
        for key in ("raw_data", "zip_data"):
            if info.get(key):
                names.append(info[key]["basename"])
    return names


def install_index(cfg: DataConfig, spec: StreamSpec, raw: bytes) -> str | None:
    """Write a remote stream's index into this node's cache; drop cached files of another version.

    Returns a note when stale files were dropped.
    """
    local = index_dir(cfg, spec)
    os.makedirs(local, exist_ok=True)
    path = os.path.join(local, INDEX)
    note = None
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            old = fh.read()
        if old == raw:
            return None
        try:
            stale = _index_files(old)
        except (ValueError, KeyError, TypeError):
            stale = [INDEX]
        for name in stale:
            for candidate in (name, name.removesuffix(".zstd").removesuffix(".gz")):
                target = os.path.join(local, candidate)
                if os.path.isfile(target):
                    os.remove(target)
        note = f"{display(spec.path)} changed since it was cached in {local}; dropped the old cached shards"
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(raw)
    os.replace(tmp, path)
    return note


def check_cache_dir(cfg: DataConfig, specs: list[StreamSpec]) -> None:
    """Every cache directory this rank will write must be creatable and writable."""
    for spec in specs:
        local = cfg.local_dir(spec)
        if local is None:
            continue
        probe = local
        while not os.path.exists(probe):
            parent = os.path.dirname(probe.rstrip("/")) or "."
            if parent == probe:
                break
            probe = parent
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            raise PreflightError(
                f"the data cache {local} is not writable ({probe} is not a writable directory): set "
                "data.cache_dir (or the stream's cache_dir) to a writable node-local directory"
            )


def _run_tokenizer(section: Any) -> tuple[str, dict] | None:
    """(path, fingerprint) of ``data.tokenizer`` when it exists (a missing one is reported by the runner)."""
    from ssa_megatron.data.tokenizer import tokenizer_file, tokenizer_fingerprint

    path = getattr(section, "tokenizer", "") or ""
    if not path or not tokenizer_file(path).is_file():
        return None
    return path, tokenizer_fingerprint(path)


def _labels(section: Any) -> dict[str, tuple[str, str]]:
    """Split path -> (the config key that named its root, the root), e.g. ("data.path", "s3://b/set")."""
    out: dict[str, tuple[str, str]] = {}
    named = [("data.path", section.path)] if section.path else []
    for key in ("streams", "valid_streams"):
        for i, entry in enumerate(getattr(section, key)):
            named.append((f"data.{key}[{i}].path", entry if isinstance(entry, str) else entry["path"]))
    for key, root in named:
        for split in ("train", VALID_SPLIT):
            out[join(root, split) if is_remote(root) else os.path.join(local_path(root), split)] = (key, root)
    return out


def preflight(
    section: Any,
    *,
    seq_len: int,
    seed: int,
    run_dir: str | None,
    rank: int = 0,
    local_rank: int = 0,
    log: Any = None,
) -> DataConfig:
    """Check the ``data`` section (collective: every rank calls it); return the loader config.

    Raises :class:`PreflightError` on every rank with the same one-line message.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    base = data_config(section, seed=seed, run_dir=run_dir, has_split=lambda spec: True)
    explicit_valid = bool(section.valid_streams)
    payload: list[Any] = [None]
    if rank == 0:
        try:
            allow = bool(getattr(section, "allow_tokenizer_mismatch", False))
            payload[0] = check_remote(base, base.valid, seq_len=seq_len, explicit_valid=explicit_valid,
                                      labels=_labels(section), tokenizer=_run_tokenizer(section),
                                      allow_tokenizer_mismatch=allow)
        except PreflightError as err:
            payload[0] = PreflightResult(error=str(err))
    if distributed:
        dist.broadcast_object_list(payload, src=0)
    result: PreflightResult = payload[0]
    if result.error:
        raise PreflightError(result.error)
    present = {s.path for s in result.streams if s.index is not None}
    cfg = data_config(section, seed=seed, run_dir=run_dir, has_split=lambda spec: spec.path in present)
    error = None
    try:
        check_cache_dir(cfg, cfg.train + cfg.valid)
        if local_rank == 0:
            by_path = {s.path: s for s in result.streams}
            for spec in cfg.train + cfg.valid:
                entry = by_path.get(spec.path)
                if entry is not None and entry.index is not None and cfg.local_dir(spec) is not None:
                    note = install_index(cfg, spec, entry.index)
                    if note and log is not None:
                        log(note)
    except PreflightError as err:
        error = str(err)
    except OSError as err:
        error = f"cannot write the data cache {cfg.cache_dir}: {err}; set data.cache_dir to a writable one"
    if distributed:
        errors: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise PreflightError(error)
    return cfg
