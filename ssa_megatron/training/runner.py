"""`run(cfg)`: everything `pretrain_ssa.py` does, in the order that fails cheapest first.

1. launch env, device and the parallel layout are checked against the world size;
2. the data and tokenizer are found (or the demo corpus is built) before any model exists;
3. megatron's parallel state, the SSA model, the engine (megatron or DeepSpeed), the loaders;
4. resume from `checkpoint.dir/latest` (or the configured checkpoint);
5. the loop, with validation and checkpoints at their intervals and on SIGTERM;
6. a final validation in every `eval.modes` mode, printed as perplexities.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from ssa_megatron.training import checkpoint as ckpt
from ssa_megatron.training.config import ConfigError, TrainConfig, data_parallel_size
from ssa_megatron.training.cpu_training import check_cpu_layout, enable_cpu_training
from ssa_megatron.training.evaluate import attention_sparsity, evaluate, validation_batches
from ssa_megatron.training.flops import peak_tflops, training_flops_per_sequence
from ssa_megatron.training.launch import LaunchEnv, detect_launch, init_distributed, resolve_device
from ssa_megatron.training.loop import MegatronEngine, StopFlag, TrainState, train
from ssa_megatron.training.metrics import MetricsLogger


@dataclass
class RunResult:
    iteration: int
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
    return load_tokenizer(tokenizer_path)


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


def build_engine(cfg: TrainConfig, vocab_size: int, device: torch.device) -> Any:
    """Parallel state, the SSA model and its engine (megatron DDP + optimizer, or DeepSpeed).

    Needs the default process group. Returns `loop.MegatronEngine` or `ds_engine.DeepSpeedEngine`.
    """
    from megatron.core import parallel_state

    from ssa_megatron.parallel.state import initialize_parallel

    enable_cpu_training()
    p = cfg.parallel
    initialize_parallel(p.tensor, p.pipeline, p.context, p.virtual_pipeline, seed=cfg.train.seed)
    mconfig = model_config(cfg, vocab_size, device)
    chunks = [c.to(device) for c in _build_model(cfg, mconfig, vocab_size)]
    if cfg.train.engine == "deepspeed":
        from ssa_megatron.training.ds_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, chunks, device, parallel_state.get_data_parallel_world_size())
    from ssa_megatron.training.optim import build_optimizer, build_scheduler, wrap_model

    model = wrap_model(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    return MegatronEngine(cfg, model, optimizer, build_scheduler(cfg, optimizer), device)


def _data_config(cfg: TrainConfig) -> Any:
    from ssa_megatron.data.sources import data_config

    return data_config(cfg.data, seed=cfg.train.seed, run_dir=cfg.checkpoint.dir)


def run(cfg: TrainConfig, env: LaunchEnv | None = None, stream: TextIO | None = None) -> RunResult:
    from megatron.core import parallel_state

    from ssa_megatron.data import build_loaders

    stream = stream or sys.stdout
    env = env or detect_launch()
    device = resolve_device(cfg.train.device)
    check_cpu_layout(cfg.train.precision, cfg.parallel.distributed_optimizer, device)
    dp = data_parallel_size(cfg, env.world_size)
    init_distributed(env, device)
    if env.is_main:
        stream.write("resolved config:\n" + cfg.to_yaml() + "\n")
        stream.flush()
    tokenizer = prepare_data(cfg, env)
    # Padded like megatron-LM (multiple of 128 x TP) so every TP rank holds an equal vocabulary slice.
    multiple = 128 * cfg.parallel.tensor
    vocab = cfg.model.vocab_size or -(-tokenizer.vocab_size // multiple) * multiple
    if vocab % cfg.parallel.tensor:
        raise ConfigError(
            f"model.vocab_size={vocab} is not divisible by parallel.tensor={cfg.parallel.tensor}"
        )
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer.vocab_size}")

    engine = build_engine(cfg, vocab, device)
    ckpt_optimizer = engine.ckpt_optimizer
    t = cfg.train
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    train_loader, valid_loader = build_loaders(
        _data_config(cfg),
        micro_batch_size=t.micro_batch_size,
        seq_len=cfg.data.seq_length,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp,
        launch=env,
    )

    state = TrainState()
    load_path = ckpt.resolve_checkpoint(cfg.checkpoint.load, cfg.checkpoint.dir)
    logging_rank = env.is_main
    logger = MetricsLogger(cfg, logging_rank, t.train_iters, stream)
    try:
        if load_path is not None:
            if cfg.checkpoint.load_weights_only:
                ckpt.load_model_weights(load_path, engine.model)
                logger.print(
                    f"loaded model weights from {load_path} (optimizer, schedule and data order start fresh)"
                )
            else:
                loaded = ckpt.load_checkpoint(load_path, engine.model, ckpt_optimizer, engine.scheduler)
                state.iteration = loaded.iteration
                state.consumed_samples = loaded.iteration * t.global_batch_size
                train_loader.load_state_dict(loaded.data_state)
                logger.print(f"resumed from {load_path} at iteration {loaded.iteration}")

        train_iter = iter(train_loader)
        val_batches = validation_batches(valid_loader, num_micro, cfg.eval.iters)
        last_saved: list[str | None] = [None]

        def save(iteration: int) -> None:
            if cfg.checkpoint.dir is None:
                return
            path = ckpt.save_checkpoint(
                cfg.checkpoint.dir,
                iteration,
                engine.model,
                ckpt_optimizer,
                engine.scheduler,
                train_loader.state_dict(),
                cfg.to_dict(),
                cfg.to_yaml(),
            )
            last_saved[0] = str(path)
            logger.print(f"saved checkpoint {path}")

        def run_eval(iteration: int) -> dict[str, dict[str, float]]:
            results: dict[str, dict[str, float]] = {}
            for mode in cfg.eval.modes:
                res = evaluate(engine, val_batches, mode)
                if cfg.eval.sparsity and val_batches:
                    sparsity = attention_sparsity(engine, val_batches[0], mode)
                    if sparsity is not None:
                        res["sparsity"] = sparsity
                results[mode] = res
                logger.scalars(f"val_{mode}", iteration, res)
            line = " | ".join(
                f"{mode}: loss {r['loss']:.4f} ppl {r['ppl']:.2f}"
                + (f" sparsity {r['sparsity']:.3f}" if "sparsity" in r else "")
                for mode, r in results.items()
            )
            logger.print(f"validation at iteration {iteration} | {line}")
            return results

        def on_interval(iteration: int, stopping: bool) -> None:
            if (
                cfg.eval.interval
                and iteration % cfg.eval.interval == 0
                and iteration < t.train_iters
                and val_batches
            ):
                run_eval(iteration)
            interval = cfg.checkpoint.save_interval
            due = interval and iteration % interval == 0
            final = iteration == t.train_iters and cfg.checkpoint.save_on_exit
            if due or final or (stopping and cfg.checkpoint.save_on_exit):
                save(iteration)

        stop = StopFlag()
        stop.install()
        flops = training_flops_per_sequence(cfg.model, cfg.data.seq_length, vocab, t.recompute)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = peak_tflops(device_name, cfg.logging.peak_tflops)

        if state.iteration < t.train_iters:
            state = train(
                cfg,
                engine,
                state,
                lambda: [next(train_iter) for _ in range(num_micro)],
                logger,
                flops,
                peak,
                device,
                on_interval,
                stop,
            )
        final_eval: dict[str, dict[str, float]] = {}
        finished = state.iteration >= t.train_iters
        if cfg.eval.at_end and val_batches and finished:
            final_eval = run_eval(state.iteration)
            summary = ", ".join(
                f"{mode}-mode validation perplexity {r['ppl']:.2f}" for mode, r in final_eval.items()
            )
            logger.print(f"final ({state.iteration} iterations): {summary}")
    finally:
        logger.close()
        # streaming keeps shared memory per loader; release it now, not at interpreter exit.
        train_loader.close()
        if valid_loader is not None:
            valid_loader.close()
    return RunResult(state.iteration, state.history, final_eval, last_saved[0])
