"""Training config schema: YAML file + `--section.key value` overrides -> validated dataclasses.

Everything a run needs is in one `TrainConfig`; it is printed once at start-up and saved
beside each checkpoint, so a checkpoint always says how it was made.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the key, the bad value and the fix."""


ATTENTION_MODES = ("ssa", "full", "sparse")


@dataclass
class ModelSection:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int | None = None
    # "ssa" trains both branches with the alignment loss; "full" and "sparse" are the baselines.
    attention_mode: str = "ssa"
    block_size: int = 16
    block_count: int = 16
    p_full: float = 0.5
    # alpha of the paper: total loss = CE + alignment_weight * mean over layers of the alignment loss.
    alignment_weight: float = 10.0
    alignment_loss: str = "smooth_l1"
    # Restrict attention to the current document (position_ids restart); the paper attends across.
    document_causal: bool = False
    # Eval-time sparse budget (None: block_count), e.g. 64 for the paper's RF 1024.
    inference_block_count: int | None = None
    kernel_backend: str = "auto"
    rotary_base: float = 500000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    tie_embeddings: bool = True
    # Set from the tokenizer when None; an explicit value must cover the tokenizer.
    vocab_size: int | None = None


@dataclass
class DataSection:
    # MDS shard directory (train/ and val/ below it) and sentencepiece tokenizer model.
    path: str = ""
    tokenizer: str = ""
    # Build the demo corpus (docstrings of installed packages), tokenizer and shards into `path`
    # when they are missing; the tokenizer is then path/tokenizer.model unless `tokenizer` is set.
    build_demo: bool = False
    demo_vocab_size: int = 4096
    demo_bytes: int = 3_000_000
    seq_length: int = 64
    num_workers: int = 0
    # Where the shards come from. `path` is a dataset root (train/ and val/ below it): a local
    # directory or any URI mosaicml-streaming reads (s3://, gs://, oci://, azure://, hf://,
    # http(s)://). `streams` is a weighted mixture of such roots instead: a list of
    # {path, proportion | repeat | choose, cache_dir}; `valid_streams` likewise for validation
    # (default: every stream's val/ split, unweighted). See ssa_megatron/data/sources.py.
    streams: list[dict] = field(default_factory=list)
    valid_streams: list[dict] = field(default_factory=list)
    # Node-local cache of remote shards (None: <checkpoint.dir>/data_cache, else a user cache).
    cache_dir: str | None = None
    # Shard hash checked after each download: "auto" (xxh64 for remote streams, none for local
    # ones), "none", or an algorithm the shards were written with (sha1, xxh64, ...).
    validate_hash: str = "auto"
    download_retry: int = 2
    download_timeout: float = 120.0
    # Samples to download ahead of training per rank (None: streaming's default).
    predownload: int | None = None
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    # None: train.seed.
    shuffle_seed: int | None = None
    # Fixes the sample order independently of the node count (elastic restarts); None: streaming picks.
    num_canonical_nodes: int | None = None


@dataclass
class ParallelSection:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True


@dataclass
class TrainSection:
    micro_batch_size: int = 2
    global_batch_size: int = 4
    train_iters: int = 30
    # End this job after that iteration (checkpoint saved); the LR schedule still spans train_iters.
    # For time-sliced allocations: the next job resumes from the checkpoint.
    stop_after: int | None = None
    seed: int = 1234
    precision: str = "bf16"
    grad_clip: float = 1.0
    recompute: str = "none"
    # What a non-finite loss or grad norm does: "skip" drops the update, "stop" ends the run.
    nan_policy: str = "skip"
    max_skipped_steps: int = 10
    # A full Python garbage collection every this many iterations on every rank, automatic
    # collection off in between (training/gc_schedule.py); 0 keeps Python's automatic collector.
    gc_interval: int = 50
    # "megatron" (DDP + megatron optimizer) or "deepspeed" (DeepSpeed engine, ZeRO 1/2).
    engine: str = "megatron"
    deepspeed_config: str | None = None
    device: str = "auto"


@dataclass
class OptimSection:
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_iters: int | None = None
    warmup_fraction: float = 0.01
    decay_style: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class CheckpointSection:
    dir: str | None = None
    save_interval: int = 0
    # "auto" resumes from dir/latest when present; a path loads that checkpoint; "none" starts fresh.
    load: str = "auto"
    # Load model weights only (e.g. onto a different parallel layout); optimizer starts fresh.
    load_weights_only: bool = False
    save_on_exit: bool = True


@dataclass
class EvalSection:
    interval: int = 0
    iters: int = 2
    modes: list[str] = field(default_factory=lambda: ["sparse", "full"])
    sparsity: bool = True
    at_end: bool = True


@dataclass
class LoggingSection:
    interval: int = 1
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    # "auto": a progress bar on an interactive terminal, plain lines otherwise.
    progress: str = "auto"
    # Peak dense bf16 FLOP/s per device for MFU; None picks a known value for the device.
    peak_tflops: float | None = None


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one value to its field type (ints are accepted where floats are expected)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {annotation!r} at {where}")


def _apply(cfg: TrainConfig, section: str, key: str, value: Any, source: str) -> None:
    sections = _section_types()
    if section not in sections:
        raise ConfigError(
            f"{source}: unknown config section {section!r}; valid sections: {', '.join(sections)}"
        )
    sec_obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(sec_obj))
    if key not in hints:
        raise ConfigError(
            f"{source}: unknown key {section}.{key}; valid keys of {section}: {', '.join(hints)}"
        )
    setattr(sec_obj, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


def parse_override_args(args: list[str]) -> list[tuple[str, str, str]]:
    """Split `--section.key value` / `--section.key=value` pairs; returns (section, key, raw value).

    Raises ValueError listing the arguments that are not of that form, so the caller can
    report them the way argparse reports unknown flags.
    """
    out: list[tuple[str, str, str]] = []
    bad: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, raw = arg.partition("=")
        if not name.startswith("--") or "." not in name[2:]:
            bad.append(arg)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                bad.append(arg)
                i += 1
                continue
            raw = args[i + 1]
            i += 1
        section, _, key = name[2:].partition(".")
        out.append((section, key.replace("-", "_"), raw))
        i += 1
    if bad:
        raise ValueError(" ".join(bad))
    return out


def parse_args_and_overrides(
    parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, list[tuple[str, str, str]]]:
    """The script's own flags plus `--section.key value` config overrides; anything else is reported
    the way argparse reports unknown flags (exit 2, "unrecognized arguments: ...")."""
    args, rest = parser.parse_known_args(argv)
    try:
        return args, parse_override_args(rest)
    except ValueError as err:
        parser.error(f"unrecognized arguments: {err}")


def load_config(path: str | Path | None, overrides: list[tuple[str, str, str]] | None = None) -> TrainConfig:
    """Read a YAML config, apply overrides (raw strings parsed as YAML scalars) and validate the result."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; pass an existing YAML, e.g. "
                "examples/tiny_cpu.yaml"
            )
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
            )
        for section, values in data.items():
            if section not in _section_types():
                raise ConfigError(
                    f"{path}: unknown config section {section!r}; valid sections: "
                    f"{', '.join(_section_types())}"
                )
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping of key: value")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for section, key, raw in overrides or []:
        value = yaml.safe_load(raw) if raw != "" else ""
        _apply(cfg, section, key, value, "command line")
    _interpolate(cfg)
    validate_static(cfg)
    return cfg


_REF = re.compile(r"\$\{([a-z_]+)\.([a-z_]+)\}")


def _interpolate(cfg: TrainConfig) -> None:
    """Replace `${section.key}` in string values, so e.g. the checkpoint directory can follow
    model.attention_mode and the three-way comparison stays a one-line config change."""

    def value_of(match: re.Match) -> str:
        section, key = match.group(1), match.group(2)
        sec = getattr(cfg, section, None)
        if sec is None or not hasattr(sec, key):
            raise ConfigError(f"reference ${{{section}.{key}}} names no config key")
        value = getattr(sec, key)
        if isinstance(value, str) and _REF.search(value):
            raise ConfigError(
                f"reference ${{{section}.{key}}} points at another reference; use a plain value"
            )
        return str(value)

    for f in dataclasses.fields(cfg):
        sec = getattr(cfg, f.name)
        for g in dataclasses.fields(sec):
            value = getattr(sec, g.name)
            if isinstance(value, str) and "${" in value:
                setattr(sec, g.name, _REF.sub(value_of, value))


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by `TrainConfig.to_dict` (e.g. from a checkpoint)."""
    cfg = TrainConfig()
    for section, values in data.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, "saved config")
    return cfg


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_static(cfg: TrainConfig) -> None:
    """Checks that need no knowledge of the world size."""
    m, t, p, o, d = cfg.model, cfg.train, cfg.parallel, cfg.optim, cfg.data
    _check(
        m.attention_mode in ATTENTION_MODES,
        f"model.attention_mode={m.attention_mode!r}; choose one of {', '.join(ATTENTION_MODES)}",
    )
    for name in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "block_size",
        "block_count",
    ):
        _check(getattr(m, name) > 0, f"model.{name}={getattr(m, name)} must be positive")
    _check(
        m.num_attention_heads % m.num_query_groups == 0,
        f"model.num_attention_heads={m.num_attention_heads} is not a multiple of "
        f"model.num_query_groups={m.num_query_groups}; pick a divisor of the head count",
    )
    if m.kv_channels is None:
        _check(
            m.hidden_size % m.num_attention_heads == 0,
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}; set model.kv_channels explicitly or change the head count",
        )
    _check(0.0 <= m.p_full <= 1.0, f"model.p_full={m.p_full} must lie in [0, 1]")
    _check(m.alignment_weight >= 0, f"model.alignment_weight={m.alignment_weight} must be >= 0")
    _check(d.seq_length > 0, f"data.seq_length={d.seq_length} must be positive")
    _check(
        bool(d.path) or bool(d.streams),
        "data.path is empty; set it to the MDS shard directory (or use data.build_demo: true)",
    )
    from ssa_megatron.data.sources import SourceError, validate_section

    try:
        validate_section(d)
    except SourceError as err:
        raise ConfigError(str(err)) from None
    if not d.build_demo:
        _check(bool(d.tokenizer), "data.tokenizer is empty; set it to the sentencepiece model file")
    for name in ("tensor", "pipeline", "context"):
        _check(getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1")
    if p.virtual_pipeline is not None:
        _check(p.pipeline > 1, f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1")
        _check(
            m.num_layers % (p.pipeline * p.virtual_pipeline) == 0,
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline x "
            f"parallel.virtual_pipeline={p.pipeline * p.virtual_pipeline}",
        )
    _check(
        m.num_layers % p.pipeline == 0,
        f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={p.pipeline}; "
        "pick a pipeline size that divides the layer count",
    )
    _check(
        m.num_attention_heads % p.tensor == 0 and m.num_query_groups % p.tensor == 0,
        f"parallel.tensor={p.tensor} must divide model.num_attention_heads={m.num_attention_heads} and "
        f"model.num_query_groups={m.num_query_groups}",
    )
    _check(
        d.seq_length % (2 * p.context) == 0 or p.context == 1,
        f"data.seq_length={d.seq_length} must be divisible by 2 x parallel.context={2 * p.context} "
        "(load-balanced context-parallel split)",
    )
    _check(
        not p.sequence_parallel or p.tensor > 1, "parallel.sequence_parallel=true needs parallel.tensor > 1"
    )
    _check(t.micro_batch_size > 0, f"train.micro_batch_size={t.micro_batch_size} must be positive")
    _check(t.global_batch_size > 0, f"train.global_batch_size={t.global_batch_size} must be positive")
    _check(t.train_iters > 0, f"train.train_iters={t.train_iters} must be positive")
    if t.stop_after is not None:
        _check(
            0 < t.stop_after <= t.train_iters,
            f"train.stop_after={t.stop_after} must lie in [1, train.train_iters={t.train_iters}]",
        )
    _check(
        t.precision in ("bf16", "fp16", "fp32"), f"train.precision={t.precision!r}; choose bf16, fp16 or fp32"
    )
    _check(
        t.recompute in ("none", "full"),
        f"train.recompute={t.recompute!r}; choose none or full (whole-layer recomputation; selective "
        "recompute of the SSA core attention is not supported)",
    )
    _check(t.nan_policy in ("skip", "stop"), f"train.nan_policy={t.nan_policy!r}; choose skip or stop")
    _check(
        t.gc_interval >= 0,
        f"train.gc_interval={t.gc_interval} must be >= 0 (0 keeps Python's automatic garbage collection)",
    )
    _check(t.engine in ("megatron", "deepspeed"), f"train.engine={t.engine!r}; choose megatron or deepspeed")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r}; choose auto, cpu or cuda")
    if t.engine == "deepspeed":
        _check(
            t.deepspeed_config is not None,
            "train.engine=deepspeed needs a DeepSpeed JSON config (--deepspeed_config or "
            "train.deepspeed_config), e.g. examples/deepspeed/zero1_bf16.json",
        )
        _check(
            Path(t.deepspeed_config).is_file(),
            f"train.deepspeed_config={t.deepspeed_config!r} does not exist",
        )
        _check(
            p.pipeline == 1,
            f"parallel.pipeline={p.pipeline} is not supported with the DeepSpeed engine (ZeRO 1/2 with "
            "tensor/data parallel); use train.engine=megatron for pipeline parallelism",
        )
    _check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    _check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must lie in [0, optim.lr={o.lr}]")
    _check(
        o.decay_style in ("cosine", "linear", "constant"),
        f"optim.decay_style={o.decay_style!r}; choose cosine, linear or constant",
    )
    _check(0 <= o.warmup_fraction < 1, f"optim.warmup_fraction={o.warmup_fraction} must lie in [0, 1)")
    if o.warmup_iters is not None:
        _check(
            0 <= o.warmup_iters < t.train_iters,
            f"optim.warmup_iters={o.warmup_iters} must lie in [0, train.train_iters={t.train_iters})",
        )
    _check(cfg.checkpoint.save_interval >= 0, "checkpoint.save_interval must be >= 0 (0 disables)")
    if cfg.checkpoint.save_interval > 0:
        _check(
            cfg.checkpoint.dir is not None,
            "checkpoint.save_interval > 0 needs checkpoint.dir (where checkpoints are written)",
        )
    for mode in cfg.eval.modes:
        _check(mode in ("sparse", "full"), f"eval.modes contains {mode!r}; use sparse and/or full")
    _check(
        cfg.logging.progress in ("auto", "bar", "lines"),
        f"logging.progress={cfg.logging.progress!r}; choose auto, bar or lines",
    )
    _check(cfg.logging.interval >= 1, f"logging.interval={cfg.logging.interval} must be >= 1")


def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    """Validate the parallel layout against the world size; return the data-parallel size."""
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tensor * p.pipeline * p.context
    _check(
        world_size % model_parallel == 0,
        f"world size {world_size} is not divisible by parallel.tensor x pipeline x context = "
        f"{p.tensor} x {p.pipeline} x {p.context} = {model_parallel}; change the layout or the number "
        "of processes",
    )
    dp = world_size // model_parallel
    _check(
        t.global_batch_size % (t.micro_batch_size * dp) == 0,
        f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size x "
        f"data-parallel size = {t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}; pick a global "
        "batch that is a multiple of it",
    )
    if p.virtual_pipeline is not None:
        micro = t.global_batch_size // (t.micro_batch_size * dp)
        _check(
            micro % p.pipeline == 0,
            f"interleaved pipeline needs the number of micro-batches ({micro}) to be a multiple of "
            f"parallel.pipeline={p.pipeline}",
        )
    return dp


def warmup_iters(cfg: TrainConfig) -> int:
    if cfg.optim.warmup_iters is not None:
        return cfg.optim.warmup_iters
    return round(cfg.optim.warmup_fraction * cfg.train.train_iters)
