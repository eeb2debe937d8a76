"""`run(cfg)`: everything `pretrain_ssa.py` does, in the order that fails cheapest first.

1. launch env, device and the parallel layout are checked against the world size; the checkpoint
   directory is checked (writable; a fresh start over another run's checkpoints is refused);
2. killed saves are recovered (rank 0); the process group is joined;
3. the data and tokenizer are found (or the demo corpus is built) before any model exists;
4. megatron's parallel state, the SSA model, the engine (megatron or DeepSpeed), the loaders;
5. `TrainingRun`: resume from `checkpoint.dir/latest` (or the configured checkpoint), the loop
   with validation and checkpoints at their intervals and on SIGTERM/Ctrl-C, a final validation
   in every `eval.modes` mode, printed as perplexities.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from ssa_megatron.training import checkpoint as ckpt
from ssa_megatron.training.config import ConfigError, TrainConfig, data_parallel_size
from ssa_megatron.training.cpu_training import check_cpu_layout, enable_cpu_training
from ssa_megatron.training.engine import Engine
from ssa_megatron.training.evaluate import attention_sparsity, evaluate, validation_batches
from ssa_megatron.training.flops import peak_tflops, training_flops_per_sequence
from ssa_megatron.training.launch import LaunchEnv, detect_launch, init_distributed, resolve_device
from ssa_megatron.training.loop import LoopContext, StopFlag, TrainState, train
from ssa_megatron.training.megatron_engine import MegatronEngine
from ssa_megatron.training.metrics import MetricsLogger, column_legend


@dataclass
class RunResult:
    iteration: int
    # Per-iteration metrics of this process's last loop.HISTORY_LENGTH iterations.
    history: list[dict[str, Any]] = field(default_factory=list)
    # {"sparse": {"loss", "ppl", "tokens", "sparsity"}, "full": {...}} from the last evaluation.
    final_eval: dict[str, dict[str, float]] = field(default_factory=dict)
    checkpoint: str | None = None


def prepare_data(cfg: TrainConfig, env: LaunchEnv) -> Any:
    """Find (or, with data.build_demo, build) the shards and tokenizer; return the loaded tokenizer.

    Runs before the model is built so a wrong path costs seconds, not a cluster allocation.
    """
    from ssa_megatron.data import load_tokenizer

    d = cfg.data
    root = Path(d.path)
    if d.build_demo:
        from ssa_megatron.data.demo_corpus import DemoDataExists, check_demo_dataset

        try:  # on every rank: demo data of other parameters is never rebuilt in place
            check_demo_dataset(root, d.seq_length, d.demo_vocab_size, target_bytes=d.demo_bytes,
                               seed=cfg.train.seed)
        except DemoDataExists as err:
            raise ConfigError(str(err)) from None
        if env.is_main:
            from ssa_megatron.data import prepare_demo_dataset

            # A no-op when `root` already holds a demo set built with the same parameters.
            demo = prepare_demo_dataset(
                root,
                seq_len=d.seq_length,
                vocab_size=d.demo_vocab_size,
                target_bytes=d.demo_bytes,
                seed=cfg.train.seed,
            )
            if demo.built:
                print(f"built the demo corpus, tokenizer and MDS shards in {root}", flush=True)
        if dist.is_initialized():
            dist.barrier()
    from ssa_megatron.data.preflight import PreflightError, preflight

    try:
        preflight(d, seq_len=d.seq_length, seed=cfg.train.seed, run_dir=cfg.checkpoint.dir, rank=env.rank,
                  local_rank=env.local_rank, log=lambda line: print(line, flush=True))
    except PreflightError as err:
        raise ConfigError(str(err)) from None
    tokenizer_path = d.tokenizer or str(root / "tokenizer.model")
    if not Path(tokenizer_path).exists():
        raise ConfigError(
            f"data.tokenizer={tokenizer_path!r} does not exist; set it to the tokenizer the shards were "
            "written "
            "with (a sentencepiece .model file or a Hugging Face tokenizer directory)"
        )
    tokenizer = load_tokenizer(tokenizer_path)
    from ssa_megatron.data.tokenizer import TokenizerMismatch, check_and_record_run_tokenizer

    try:  # the shards' and the checkpoint's recorded tokenizer (data/tokenizer.py, provenance)
        check_and_record_run_tokenizer(
            d, tokenizer_path, tokenizer, checkpoint_dir=None, record=False,
            load_path=ckpt.resolve_checkpoint(cfg.checkpoint.load, cfg.checkpoint.dir),
        )
    except TokenizerMismatch as err:
        raise ConfigError(str(err)) from None
    return tokenizer


def model_config(cfg: TrainConfig, vocab_size: int, device: torch.device) -> Any:
    from ssa_megatron.training.config import transformer_config_of

    return transformer_config_of(cfg, device)


def _build_model(cfg: TrainConfig, config: Any, vocab_size: int) -> list[torch.nn.Module]:
    from ssa_megatron.model.gpt import build_model_chunks

    return build_model_chunks(
        config,
        vocab_size,
        cfg.data.seq_length,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
    )


def build_engine(cfg: TrainConfig, vocab_size: int, device: torch.device) -> Engine:
    """Parallel state, the SSA model and its engine (megatron DDP + optimizer, or DeepSpeed).

    Needs the default process group.
    """
    from megatron.core import parallel_state

    from ssa_megatron.parallel.state import initialize_parallel

    enable_cpu_training()
    p = cfg.parallel
    initialize_parallel(p.tensor, p.pipeline, p.context, p.virtual_pipeline, seed=cfg.train.seed)
    mconfig = model_config(cfg, vocab_size, device)
    chunks = [c.to(device) for c in _build_model(cfg, mconfig, vocab_size)]
    if cfg.train.engine == "deepspeed":
        from ssa_megatron.training.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, chunks, device, parallel_state.get_data_parallel_world_size())
    from ssa_megatron.training.optim import build_optimizer, build_scheduler, wrap_model

    model = wrap_model(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    return MegatronEngine(cfg, model, optimizer, build_scheduler(cfg, optimizer), device)


def _data_config(cfg: TrainConfig) -> Any:
    from ssa_megatron.data.sources import data_config

    return data_config(cfg.data, seed=cfg.train.seed, run_dir=cfg.checkpoint.dir)


def padded_vocab_size(cfg: TrainConfig, tokenizer_vocab: int) -> int:
    # Padded like megatron-LM (multiple of 128 x TP) so every TP rank holds an equal vocabulary slice.
    multiple = 128 * cfg.parallel.tensor
    vocab = cfg.model.vocab_size or -(-tokenizer_vocab // multiple) * multiple
    if vocab % cfg.parallel.tensor:
        raise ConfigError(
            f"model.vocab_size={vocab} is not divisible by parallel.tensor={cfg.parallel.tensor}"
        )
    if vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    return vocab


def run(cfg: TrainConfig, env: LaunchEnv | None = None, stream: TextIO | None = None) -> RunResult:
    from megatron.core import parallel_state

    from ssa_megatron.data import build_loaders

    stream = stream or sys.stdout
    env = env or detect_launch()
    device = resolve_device(cfg.train.device)
    check_cpu_layout(cfg.train.precision, cfg.parallel.distributed_optimizer, device)
    dp = data_parallel_size(cfg, env.world_size)
    c = cfg.checkpoint
    ckpt.check_checkpoint_dir(c.dir, c.load, c.overwrite)
    if env.is_main:
        for line in ckpt.prepare_checkpoint_dir(c.dir, c.load, c.overwrite):
            stream.write(line + "\n")
    init_distributed(env, device)
    if env.world_size > 1:
        # No rank reads the checkpoint directory before rank 0 has recovered it.
        dist.barrier()
    ckpt.install_writer_guards()
    if env.is_main:
        stream.write("resolved config:\n" + cfg.to_yaml() + "\n")
        stream.flush()
    tokenizer = prepare_data(cfg, env)
    vocab = padded_vocab_size(cfg, tokenizer.vocab_size)
    engine = build_engine(cfg, vocab, device)
    t = cfg.train
    train_loader, valid_loader = build_loaders(
        _data_config(cfg),
        micro_batch_size=t.micro_batch_size,
        seq_len=cfg.data.seq_length,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        launch=env,
    )
    try:
        return TrainingRun(cfg, env, engine, device, vocab, train_loader, valid_loader, stream).execute()
    finally:
        # streaming keeps shared memory per loader; release it now, not at interpreter exit.
        train_loader.close()
        if valid_loader is not None:
            valid_loader.close()


class Validator:
    """Validation in every eval.modes mode on fixed batches of the validation split."""

    def __init__(self, cfg: TrainConfig, engine: Engine, val_batches: list, logger: MetricsLogger) -> None:
        self.cfg, self.engine, self.batches, self.logger = cfg, engine, val_batches, logger

    def __bool__(self) -> bool:
        return bool(self.batches)

    def run(self, iteration: int) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        for mode in self.cfg.eval.modes:
            res = evaluate(self.engine, self.batches, mode)
            if self.cfg.eval.sparsity and self.batches:
                sparsity = attention_sparsity(self.engine, self.batches[0], mode)
                if sparsity is not None:
                    res["sparsity"] = sparsity
            results[mode] = res
            self.logger.scalars(f"val_{mode}", iteration, res)
        line = " | ".join(
            f"{mode}: loss {r['loss']:.4f} ppl {r['ppl']:.2f}"
            + (f" sparsity {r['sparsity']:.3f}" if "sparsity" in r else "")
            for mode, r in results.items()
        )
        self.logger.print(f"validation at iteration {iteration} | {line}")
        return results


class TrainingRun:
    """One run on a built engine and loaders: resume, train, validate and checkpoint as due, evaluate."""

    def __init__(
        self, cfg: TrainConfig, env: LaunchEnv, engine: Engine, device: torch.device, vocab: int,
        train_loader: Any, valid_loader: Any, stream: TextIO,
    ) -> None:  # fmt: skip
        t = cfg.train
        self.cfg, self.engine, self.device, self.vocab = cfg, engine, device, vocab
        self.num_micro = t.global_batch_size // (t.micro_batch_size * data_parallel_size(cfg, env.world_size))
        self.train_loader = train_loader
        self.logger = MetricsLogger(cfg, env.is_main, t.train_iters, stream)
        self.checkpointer = ckpt.Checkpointer(cfg, engine, train_loader, self.logger.print)
        self.validator = Validator(
            cfg, engine, validation_batches(valid_loader, self.num_micro, cfg.eval.iters), self.logger
        )
        self.batches: Iterator[Any] | None = None

    def next_batches(self) -> list[Any]:
        assert self.batches is not None
        return [next(self.batches) for _ in range(self.num_micro)]

    def after_iteration(self, iteration: int, stopping: bool) -> None:
        cfg = self.cfg
        every = cfg.eval.interval
        if every and iteration % every == 0 and iteration < cfg.train.train_iters and self.validator:
            self.validator.run(iteration)
        c = cfg.checkpoint
        due = c.save_interval and iteration % c.save_interval == 0
        at_exit = c.save_on_exit and (stopping or iteration == cfg.train.train_iters)
        if due or at_exit:
            self.checkpointer.save(iteration)

    def execute(self) -> RunResult:
        cfg, t = self.cfg, self.cfg.train
        state = TrainState()
        final_eval: dict[str, dict[str, float]] = {}
        try:
            state.iteration = self.checkpointer.resume()
            state.consumed_samples = state.iteration * t.global_batch_size
            self.batches = iter(self.train_loader)
            self.logger.print(column_legend(cfg.model.alignment_weight))
            if state.iteration < t.train_iters:
                self.logger.start(state.iteration)
                stop = StopFlag()
                stop.install()
                device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
                ctx = LoopContext(
                    cfg=cfg,
                    next_batches=self.next_batches,
                    logger=self.logger,
                    flops_per_sequence=training_flops_per_sequence(
                        cfg.model, cfg.data.seq_length, self.vocab, t.recompute
                    ),
                    peak_tflops=peak_tflops(device_name, cfg.logging.peak_tflops),
                    device=self.device,
                    after_iteration=self.after_iteration,
                    stop=stop,
                )
                try:
                    state = train(self.engine, state, ctx)
                finally:
                    stop.restore()
            else:
                self.logger.print(f"training is complete ({state.iteration}/{t.train_iters} iterations)")
            if cfg.eval.at_end and self.validator and state.iteration >= t.train_iters:
                final_eval = self.validator.run(state.iteration)
                summary = ", ".join(
                    f"{mode}-mode validation perplexity {r['ppl']:.2f}" for mode, r in final_eval.items()
                )
                self.logger.print(f"final ({state.iteration} iterations): {summary}")
        finally:
            self.logger.close()
        return RunResult(state.iteration, list(state.history), final_eval, self.checkpointer.last_saved)
