"""Training config schema: YAML file + `--section.key value` overrides -> validated dataclasses.

Everything a run needs is in one `TrainConfig`; it is printed once at start-up and saved
beside each checkpoint, so a checkpoint always says how it was made. The `model:` section is
`ssa_megatron.model.config.ModelConfig`, the one model config. The comment above each field is its
help text (`pretrain_ssa.py --help` prints them, see `config_help`): keep one per key.

Every check runs at load time (`load_config`), before torch or megatron is imported, so a bad value
costs a fraction of a second and one line naming the key, the value and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import math
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssa_megatron.model.config import (
    PRECISIONS,
    RECOMPUTE,
    ConfigError,
    ModelConfig,
    check_block_budget,
)

__all__ = ["ConfigError", "ModelConfig", "ModelSection", "TrainConfig", "load_config"]

# The `model:` section (kept under this name for the modules that import it).
ModelSection = ModelConfig


@dataclass
class DataSection:
    # MDS shard directory (train/ and val/ below it).
    path: str = ""
    # Tokenizer the shards were written with (sentencepiece .model or Hugging Face directory).
    tokenizer: str = ""
    # Build the demo corpus (docstrings of installed packages), tokenizer and shards into `path`
    # when they are missing; the tokenizer is then path/tokenizer.model unless `tokenizer` is set.
    build_demo: bool = False
    # Vocabulary size of the demo tokenizer (data.build_demo).
    demo_vocab_size: int = 4096
    # Bytes of text in the demo corpus (data.build_demo).
    demo_bytes: int = 3_000_000
    # Tokens per training sequence; in ssa/sparse mode it must exceed model.block_size x block_count.
    seq_length: int = 64
    # Data-loader worker processes per rank (0: load in the training process).
    num_workers: int = 0
    # Where the shards come from. `path` is a dataset root (train/ and val/ below it): a local
    # directory or any URI mosaicml-streaming reads (s3://, gs://, oci://, azure://, hf://,
    # http(s)://). `streams` is a weighted mixture of such roots instead: a list of
    # {path, proportion | repeat | choose, cache_dir}; `valid_streams` likewise for validation
    # (default: every stream's val/ split, unweighted). See ssa_megatron/data/sources.py.
    streams: list[dict] = field(default_factory=list)
    # Validation mixture, entries like `streams` (empty: every stream's val/ split, unweighted).
    valid_streams: list[dict] = field(default_factory=list)
    # Node-local cache of remote shards (None: <checkpoint.dir>/data_cache, else a user cache).
    cache_dir: str | None = None
    # Shard hash checked after each download: "auto" (xxh64 for remote streams, none for local
    # ones), "none", or an algorithm the shards were written with (sha1, xxh64, ...).
    validate_hash: str = "auto"
    # Download attempts per shard file (>= 1).
    download_retry: int = 2
    # Seconds one shard download may take before it is retried.
    download_timeout: float = 120.0
    # Samples to download ahead of training per rank (None: streaming's default).
    predownload: int | None = None
    # Shuffle the training samples (deterministic given the seed, resumable).
    shuffle: bool = True
    # mosaicml-streaming's shuffle algorithm: py1e, py1br, py1s, py2s or naive.
    shuffle_algo: str = "py1e"
    # None: train.seed.
    shuffle_seed: int | None = None
    # Fixes the sample order independently of the node count (elastic restarts); None: streaming picks.
    num_canonical_nodes: int | None = None
    # Train (or resume) although the tokenizer differs from the one the shards or the checkpoint
    # recorded (tokenizer_fingerprint.json); without it such a run is refused at start-up.
    allow_tokenizer_mismatch: bool = False


@dataclass
class ParallelSection:
    # Tensor-parallel size (must divide the query and KV head counts).
    tensor: int = 1
    # Pipeline-parallel stages (must divide model.num_layers).
    pipeline: int = 1
    # Model chunks per pipeline stage (interleaved 1F1B); None: not interleaved.
    virtual_pipeline: int | None = None
    # Context-parallel size: each sequence split over this many ranks (load-balanced).
    context: int = 1
    # Sequence parallelism of the norms/dropout regions (needs parallel.tensor > 1).
    sequence_parallel: bool = False
    # megatron's distributed optimizer (ZeRO-1 style); CUDA parameters only.
    distributed_optimizer: bool = True


@dataclass
class TrainSection:
    # Sequences per forward on one data-parallel rank.
    micro_batch_size: int = 2
    # Sequences per optimizer step over all ranks (a multiple of micro_batch_size x data-parallel size).
    global_batch_size: int = 4
    # Length of the run (and of the LR schedule) in optimizer steps.
    train_iters: int = 30
    # End this job after that iteration (checkpoint saved); the LR schedule still spans train_iters.
    # For time-sliced allocations: the next job resumes from the checkpoint (checkpoint.load: auto).
    stop_after: int | None = None
    # Seeds initialisation, data order and the per-micro-batch attention-mode draw.
    seed: int = 1234
    # bf16 or fp16 (mixed precision, fp32 master weights) or fp32.
    precision: str = "bf16"
    # Gradient-norm clipping threshold.
    grad_clip: float = 1.0
    # Activation recomputation: none, or full (whole layers).
    recompute: str = "none"
    # What a non-finite loss or grad norm does: "skip" drops the update, "stop" ends the run.
    nan_policy: str = "skip"
    # Under nan_policy skip, stop the run after this many skipped updates.
    max_skipped_steps: int = 10
    # A full Python garbage collection every this many iterations on every rank, automatic
    # collection off in between (training/gc_schedule.py); 0 keeps Python's automatic collector.
    gc_interval: int = 50
    # "megatron" (DDP + megatron optimizer) or "deepspeed" (DeepSpeed engine, ZeRO 1/2).
    engine: str = "megatron"
    # DeepSpeed JSON config (train.engine deepspeed), e.g. examples/deepspeed/zero1_bf16.json.
    deepspeed_config: str | None = None
    # auto (CUDA when available), cpu or cuda.
    device: str = "auto"


@dataclass
class OptimSection:
    # Peak learning rate (AdamW).
    lr: float = 1e-3
    # Learning rate at the end of the decay.
    min_lr: float = 0.0
    # Linear warm-up steps (None: warmup_fraction x train.train_iters).
    warmup_iters: int | None = None
    # Warm-up as a fraction of train.train_iters, used when warmup_iters is None.
    warmup_fraction: float = 0.01
    # LR decay after warm-up: cosine, linear or constant.
    decay_style: str = "cosine"
    # AdamW beta1.
    adam_beta1: float = 0.9
    # AdamW beta2.
    adam_beta2: float = 0.95
    # AdamW epsilon.
    adam_eps: float = 1e-8
    # Decoupled weight decay (not applied to norms and biases).
    weight_decay: float = 0.1


@dataclass
class CheckpointSection:
    # Where checkpoints are written (None: nowhere). Any string value may use ${section.key}, e.g.
    # runs/${model.attention_mode}: replaced by that key's value after the overrides are applied.
    dir: str | None = None
    # Save every this many iterations (0: only at the end and on SIGTERM, see save_on_exit).
    save_interval: int = 0
    # Resume: "auto" resumes from dir/latest when present (model, optimizer, LR schedule, data
    # order); a path loads that checkpoint; "none" starts fresh.
    load: str = "auto"
    # Load model weights only (e.g. onto a different parallel layout); optimizer starts fresh.
    load_weights_only: bool = False
    # Save when the run ends or is stopped (SIGTERM, Ctrl-C, train.stop_after).
    save_on_exit: bool = True
    # A fresh start (load: none) into a dir holding another run's checkpoints is refused unless
    # this is true; the earlier run's checkpoints are then removed at start-up.
    overwrite: bool = False


@dataclass
class EvalSection:
    # Validate every this many iterations (0: only at the end).
    interval: int = 0
    # Global batches of the validation split per evaluation (the same rows each time).
    iters: int = 2
    # Inference modes to validate in (sparse and/or full), comma-separated on the command line.
    modes: list[str] = field(default_factory=lambda: ["sparse", "full"])
    # Also measure attention sparsity (the paper's Definition 1) per mode.
    sparsity: bool = True
    # Validate after the last iteration.
    at_end: bool = True


@dataclass
class LoggingSection:
    # Log training metrics every this many iterations.
    interval: int = 1
    # TensorBoard event directory; "auto": <checkpoint.dir>/tensorboard, one per run (nothing without
    # a checkpoint.dir); None: no TensorBoard.
    tensorboard_dir: str | None = "auto"
    # Weights & Biases project to log to from rank 0 (None: no wandb; needs the wandb package and a
    # login, e.g. WANDB_API_KEY); the resolved config is logged with the run.
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string.
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}={value!r} is not a finite number; give a finite value")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}={value!r} is not a finite number; quote it if it is a name")
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, but a key given twice in one mapping is an error (SafeLoader keeps the last,
    silently dropping the first value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error (its own message spans several, with a copy of the text)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python value (duplicate keys refused); errors as one-line ``ConfigError``."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {_yaml_problem(err)}; fix the YAML") from None


def _override_value(section: str, key: str, raw: str) -> Any:
    if raw == "":
        return ""
    try:
        return yaml.load(raw, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(
            f"command line: --{section}.{key} {raw!r} is not a valid YAML value ({_yaml_problem(err)}); "
            "quote it or fix it"
        ) from None


def load_config(
    path: str | Path | None,
    overrides: list[tuple[str, str, str]] | None = None,
    warn: Callable[[str], None] | None = None,
) -> TrainConfig:
    """Read a YAML config, apply overrides (raw strings parsed as YAML values), resolve ``${section.key}``
    references and validate the result. Warnings (a valid but likely unintended setting) go to ``warn``,
    one line each (default: stderr)."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; pass an existing YAML, e.g. "
                "examples/tiny_cpu.yaml"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"config file {str(path)!r} cannot be read ({reason}); pass a readable YAML"
            ) from None
        data = parse_yaml(text, str(path)) or {}
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
            if values is None:
                continue  # an empty section keeps its defaults
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping of key: value")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for section, key, raw in overrides or []:
        _apply(cfg, section, key, _override_value(section, key, raw), "command line")
    _interpolate(cfg)
    validate_static(cfg)
    for line in config_warnings(cfg):
        if warn is None:
            print(f"config warning: {line}", file=sys.stderr)
        else:
            warn(line)
    return cfg


def config_warnings(cfg: TrainConfig) -> list[str]:
    """Valid settings that are likely unintended (one line each)."""
    out = []
    sparse_eval = "sparse" in cfg.eval.modes or cfg.model.inference_mode == "sparse"
    budget = check_block_budget(cfg.model, cfg.data.seq_length)
    if budget is not None and sparse_eval:
        out.append(budget)
    return out


_REF = re.compile(r"\$\{([a-z_]+)\.([a-z_]+)\}")


def _interpolate(cfg: TrainConfig) -> None:
    """Replace `${section.key}` in string values, so e.g. the checkpoint directory can follow
    model.attention_mode and the three-way comparison stays a one-line config change."""

    def value_of(match: re.Match) -> str:
        section, key = match.group(1), match.group(2)
        sec = getattr(cfg, section, None)
        if sec is None or not hasattr(sec, key):
            raise ConfigError(
                f"reference ${{{section}.{key}}} names no config key; refer to an existing key, e.g. "
                "${model.attention_mode}"
            )
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


def _check_finite(value: Any, where: str) -> None:
    """No nan/inf anywhere, nested values (e.g. data.streams entries) included."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}={value} is not a finite number; give a finite value")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def validate_static(cfg: TrainConfig) -> None:
    """Checks that need no knowledge of the world size."""
    m, t, p, o, d = cfg.model, cfg.train, cfg.parallel, cfg.optim, cfg.data
    _check_finite(cfg.to_dict(), "")
    m.validate()
    _check(d.seq_length > 0, f"data.seq_length={d.seq_length} must be positive")
    check_block_budget(m, d.seq_length)
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
        t.precision in PRECISIONS, f"train.precision={t.precision!r}; choose bf16, fp16 or fp32"
    )
    _check(
        t.recompute in RECOMPUTE,
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


def transformer_config_of(cfg: TrainConfig, device: Any, recompute: str | None = None) -> Any:
    """megatron's ``SSATransformerConfig`` of a training config on ``device`` (a ``torch.device``):
    ``ssa_megatron.model.config.transformer_config`` with this config's layout, precision and seed.
    ``recompute`` replaces ``train.recompute`` (inference builds without recomputation)."""
    from ssa_megatron.model.config import transformer_config

    t = cfg.train
    # The parallel section's layout fields are transformer_config's layout arguments, name for name.
    layout = ("tensor", "pipeline", "virtual_pipeline", "context", "sequence_parallel")
    return transformer_config(
        cfg.model,
        **{name: getattr(cfg.parallel, name) for name in layout},
        precision=t.precision,
        recompute=t.recompute if recompute is None else recompute,
        cpu_initialization=device.type == "cpu",
        mode_seed=t.seed,
    )


# --- help ---------------------------------------------------------------------------------------------

_FIELD_LINE = re.compile(r"^    ([A-Za-z_]\w*)\s*:")


def field_comments(cls: type) -> dict[str, str]:
    """Each field's help: the comment lines right above it in the dataclass's source, joined into one
    line (the source is the one place a key is described)."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        if line.startswith("    #"):
            pending.append(line.strip().lstrip("#").strip())
            continue
        match = _FIELD_LINE.match(line)
        if match:
            comments[match.group(1)] = " ".join(pending)
        pending = []
    return comments


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return "|".join(_type_name(a) for a in inner) + "|null"
    if origin is list:
        return f"LIST[{_type_name(typing.get_args(annotation)[0])}]"
    if annotation is dict or origin is dict:
        return "MAPPING"
    return {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}.get(annotation, str(annotation))


def yaml_value(value: Any) -> str:
    """A value as it would be written in the YAML config."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()


def config_help(width: int = 100) -> str:
    """Every config key as ``--section.key TYPE (default: D)`` with its comment, section by section."""
    defaults = TrainConfig()
    lines = [
        "config keys: any of them can be set in the YAML file (section: {key: value}) or overridden with",
        "--section.key VALUE (VALUE is read as YAML; lists also comma-separated). A string value may refer",
        "to another key as ${section.key}, replaced after the overrides, e.g.",
        "--checkpoint.dir runs/${model.attention_mode}. --print-config shows the result.",
    ]
    for name, section_type in _section_types().items():
        lines.append("")
        lines.append(f"{name}:")
        hints = typing.get_type_hints(section_type)
        comments = field_comments(section_type)
        section = getattr(defaults, name)
        for f in dataclasses.fields(section_type):
            default = yaml_value(getattr(section, f.name))
            lines.append(f"  --{name}.{f.name} {_type_name(hints[f.name])} (default: {default})")
            comment = comments.get(f.name, "")
            if comment:
                lines.extend(textwrap.wrap(comment, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
