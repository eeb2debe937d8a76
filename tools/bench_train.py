"""Training throughput of the whole stack on GPUs, each attention mode timed in the same run.

    torchrun --nproc-per-node 1 tools/bench_train.py --config examples/ssa_1b_8k.yaml --modes full ssa
    torchrun --nproc-per-node 4 tools/bench_train.py --config examples/ssa_1b_8k.yaml --modes ssa \
        --compare-to benchmarks/results/train_<1-gpu run>.json        # data-parallel scaling
    torchrun --nproc-per-node 2 tools/bench_train.py --config ... --parallel.context 2 --data.seq_length 32768

The model is built once through the training stack itself (`runner.build_engine`: megatron DDP,
distributed optimizer, bf16 with fp32 master weights) and fed synthetic token batches of the
configured shape; the modes take turns on it (one call of each, then the next round), so drift in
GPU clocks and temperature reaches every mode alike. Two measurements, each the median of
CUDA-event timings after warm-up: the forward+backward of one global batch without the optimizer
(the figure the SSA authors' 1B measurement reports), and the whole step with the optimizer.
Also: tokens/s per GPU, model TFLOP/s per GPU counting only the main path (full-attention FLOPs,
as MFU does) and counting every branch that runs, the bf16 matmul rate measured on this GPU, and peak memory.
Prints a table with the project's targets (MISS where missed) and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The project's training targets (H100, bf16, 1B layout, seq 8192, batch 1; benchmarks/RESULTS.md).
SSA_OVER_FULL_TARGET = 0.90
FULL_MFU_TARGET = 0.40
SSA_FWDBWD_TOKENS_TARGET = 38_800.0
SSA_MEMORY_RATIO_TARGET = 1.15
DP_EFFICIENCY_TARGET = 0.90


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[tuple[str, str, str]]]:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0]
        + " Any training-config key can be overridden with --section.key value."
    )
    p.add_argument("--config", help="training YAML, e.g. examples/ssa_1b_8k.yaml")
    p.add_argument("--modes", nargs="+", default=["full", "ssa"], choices=["full", "ssa", "sparse"])
    p.add_argument("--vocab-size", type=int, default=128256, help="used when the config sets none")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step and GPU")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS forward+backward passes and STEPS steps per mode: top kernels, "
                   "busy vs wall time, host waits")
    p.add_argument("--compare-to", type=Path, help="a 1-GPU result of this script: report DP scaling")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/train_<time>.json)")
    from ssa_megatron.training.config import parse_args_and_overrides

    args, overrides = parse_args_and_overrides(p, argv)
    if args.config is None:
        p.error("--config is required, e.g. --config examples/ssa_1b_8k.yaml")
    if args.accum < 1 or args.reps < 1 or args.warmup < 0 or args.profile < 0:
        p.error("--accum and --reps must be >= 1, --warmup and --profile >= 0")
    return args, overrides


def synthetic_batches(cfg: Any, vocab: int, count: int, seed: int) -> list[dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    b, s = cfg.train.micro_batch_size, cfg.data.seq_length
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, vocab, (b, s + 1), generator=gen)
        batches.append({
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s),
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
        })  # fmt: skip
    return batches


def bench_modes(
    args: argparse.Namespace, overrides: list, world: int, device: Any
) -> dict[str, dict[str, Any]]:
    """One engine, every mode timed on it in turns (see ``interleaved_cuda_times_ms``).

    The modes differ only in ``attention_mode``, which each call names for its own forwards
    (``override_mode``; the parameters are the same and the shared config is left alone), so one engine
    serves them all, and with a step of each mode in turn every mode sees the
    same GPU temperature and clocks. Timed one after the other, the later mode took the drift: in one
    H200 run, ssa's step times rose from 236 to 254 ms over its eight steps, while full's, timed
    before, stayed within 209-216 ms.
    """
    import torch

    from ssa_megatron.benchmarking import interleaved_cuda_times_ms, kernel_profile
    from ssa_megatron.model.mode import override_mode, planned_modes
    from ssa_megatron.training.config import data_parallel_size, load_config
    from ssa_megatron.training.flops import training_flops_per_sequence
    from ssa_megatron.training.gc_schedule import ScheduledGC
    from ssa_megatron.training.loop import train_step
    from ssa_megatron.training.runner import build_engine

    base = load_config(args.config, overrides)
    dp = data_parallel_size(base, world)
    gbs = base.train.micro_batch_size * dp * args.accum
    cfg = load_config(args.config, [*overrides, ("train", "global_batch_size", str(gbs))])
    vocab = cfg.model.vocab_size or args.vocab_size
    engine = build_engine(cfg, vocab, device)
    batches = synthetic_batches(cfg, vocab, args.accum, seed=1234)
    iteration = [0]
    # Garbage collection as the training loop schedules it (train.gc_interval; 0: automatic).
    collector = ScheduledGC(cfg.train.gc_interval)
    on_gpu = device.type == "cuda"
    peaks: dict[str, list[float]] = {mode: [] for mode in args.modes}
    step_draws: dict[str, list[list[str]]] = {mode: [] for mode in args.modes}

    def run_as(mode: str, with_optimizer: bool) -> Callable[[], None]:
        def run() -> None:
            iteration[0] += 1
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            with override_mode(engine.model, attention_mode=mode) as override:
                if with_optimizer:
                    draws = planned_modes(engine.model_config, iteration[0], args.accum, override)
                    step_draws[mode].append(draws)
                    train_step(engine, iteration[0], batches)
                else:
                    engine.forward_backward(iteration[0], batches, forward_only=False)
            if on_gpu:
                peaks[mode].append(torch.cuda.max_memory_allocated() / 2**30)
            collector.step(iteration[0])

        return run

    fwd_bwd = {mode: run_as(mode, False) for mode in args.modes}
    steps = {mode: run_as(mode, True) for mode in args.modes}
    with collector:
        fwd_bwd_samples = interleaved_cuda_times_ms(fwd_bwd, args.reps, args.warmup)
        step_samples = interleaved_cuda_times_ms(steps, args.reps, args.warmup)
        profiles = {
            mode: {"profile_fwd_bwd": kernel_profile(fwd_bwd[mode], args.profile),
                   "profile_step": kernel_profile(steps[mode], args.profile)}
            for mode in (args.modes if args.profile else [])
        }  # fmt: skip

    seq = cfg.data.seq_length
    par = cfg.parallel
    seqs_per_gpu = cfg.train.micro_batch_size * args.accum / (par.tensor * par.context * par.pipeline)
    tokens_per_gpu = seqs_per_gpu * seq

    def flops_per_gpu(attention_mode: str) -> float:
        model = dataclasses.replace(cfg.model, attention_mode=attention_mode)
        return training_flops_per_sequence(model, seq, vocab, cfg.train.recompute) * seqs_per_gpu

    flops_main = flops_per_gpu("full")  # MFU counts the main path only
    rows = {}
    for mode in args.modes:
        fwd_bwd_ms = statistics.median(fwd_bwd_samples[mode])
        step_ms = statistics.median(step_samples[mode])
        flops_all = flops_per_gpu(mode)
        row = {
            "mode": mode,
            "world_size": world,
            "data_parallel": dp,
            "tensor": par.tensor,
            "context": par.context,
            "pipeline": par.pipeline,
            "seq_length": seq,
            "micro_batch": cfg.train.micro_batch_size,
            "accum": args.accum,
            "num_layers": cfg.model.num_layers,
            "fwd_bwd_ms": fwd_bwd_ms,
            "step_ms": step_ms,
            "fwd_bwd_tokens_per_s_per_gpu": tokens_per_gpu / (fwd_bwd_ms * 1e-3),
            "step_tokens_per_s_per_gpu": tokens_per_gpu / (step_ms * 1e-3),
            "step_tflops_main_path": flops_main / (step_ms * 1e-3) / 1e12,
            "step_tflops_all_branches": flops_all / (step_ms * 1e-3) / 1e12,
            "peak_memory_gib": max(peaks[mode]) if peaks[mode] else None,
            "fwd_bwd_ms_samples": fwd_bwd_samples[mode],
            "step_ms_samples": step_samples[mode],
            # The branch that drove each timed step's micro-batches (in ssa mode both branches run).
            "step_main_branches": step_draws[mode][-args.reps:],
        }
        rows[mode] = row | profiles.get(mode, {})
    return rows


def release_model() -> None:
    """Free the model and the parallel state."""
    import torch

    from ssa_megatron.parallel.state import destroy_parallel

    destroy_parallel()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_summary(label: str, profile: dict[str, Any], top: int = 5) -> str:
    """One paragraph of a ``kernel_profile``: busy vs wall, the heaviest kernels, the host waits, and where
    the device waited for launches."""
    lines = [f"{label}: device busy {profile['device_busy_ms']:.1f} of {profile['wall_ms']:.1f} ms wall"]
    for kernel in profile["top_kernels"][:top]:
        lines.append(f"    {kernel['ms']:8.2f} ms  x{kernel['launches']:<4} {kernel['name'][:90]}")
    waits = ", ".join(f"{w['name']} x{w['calls']:g}" for w in profile["host_waits"])
    lines.append(f"    host waits: {waits or 'none'}")
    if "idle_gaps" in profile:
        gaps = profile["idle_gaps"]
        lines.append(f"    device idle {gaps['idle_ms']:.1f} ms, waiting for launches from:")
        for charge in gaps["by_launching_op"][:top]:
            lines.append(f"    {charge['ms']:8.2f} ms  x{charge['gaps']:<6g} {charge['name'][:110]}")
    return "\n".join(lines)


def verdicts(rows: dict[str, dict], peak: float | None, scaling: dict | None) -> list[str]:
    out = []

    def check(name: str, value: float, target: float, higher: bool = True) -> None:
        ok = value >= target if higher else value <= target
        out.append(f"{name}: {value:.3f} ({'>=' if higher else '<='} {target}) {'ok' if ok else 'MISS'}")

    if "full" in rows and peak is not None:
        check("full-mode step MFU (main path / measured matmul peak)",
              rows["full"]["step_tflops_main_path"] / peak, FULL_MFU_TARGET)  # fmt: skip
    if "ssa" in rows:
        check("ssa fwd+bwd tokens/s per GPU", rows["ssa"]["fwd_bwd_tokens_per_s_per_gpu"],
              SSA_FWDBWD_TOKENS_TARGET)  # fmt: skip
    if "ssa" in rows and "full" in rows:
        check("ssa / full step throughput",
              rows["ssa"]["step_tokens_per_s_per_gpu"] / rows["full"]["step_tokens_per_s_per_gpu"],
              SSA_OVER_FULL_TARGET)  # fmt: skip
        if rows["full"]["peak_memory_gib"]:
            check("ssa / full peak memory", rows["ssa"]["peak_memory_gib"] / rows["full"]["peak_memory_gib"],
                  SSA_MEMORY_RATIO_TARGET, higher=False)  # fmt: skip
    for mode, eff in (scaling or {}).items():
        check(f"{mode} data-parallel efficiency (per-GPU step tokens/s vs 1 GPU)", eff, DP_EFFICIENCY_TARGET)
    return out


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    import torch.distributed as dist

    from ssa_megatron.benchmarking import environment, measured_matmul_tflops, write_result
    from ssa_megatron.training.launch import detect_launch, init_distributed, resolve_device

    device = resolve_device("auto")
    if device.type != "cuda":
        print("bench_train: no CUDA GPU; this is a smoke run and its timings are not benchmark figures")
    env = detect_launch()
    init_distributed(env, device)
    peak = measured_matmul_tflops() if device.type == "cuda" else None
    rows = bench_modes(args, overrides, env.world_size, device)
    release_model()
    scaling = None
    if args.compare_to is not None:
        base = {r["mode"]: r for r in json.loads(args.compare_to.read_text())["rows"]}
        scaling = {
            m: r["step_tokens_per_s_per_gpu"] / base[m]["step_tokens_per_s_per_gpu"]
            for m, r in rows.items()
            if m in base
        }
    if env.is_main:
        cols = ["mode", "world_size", "seq_length", "fwd_bwd_ms", "step_ms", "fwd_bwd_tokens_per_s_per_gpu",
                "step_tokens_per_s_per_gpu", "step_tflops_main_path", "step_tflops_all_branches",
                "peak_memory_gib"]  # fmt: skip
        print(f"measured bf16 matmul peak: {peak} TFLOP/s")
        print(" | ".join(cols))
        for row in rows.values():
            print(" | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
        for row in rows.values():
            for key in ("profile_fwd_bwd", "profile_step"):
                if key in row:
                    print(profile_summary(f"{row['mode']} {key.removeprefix('profile_')}", row[key]))
        checks = verdicts(rows, peak, scaling)
        print("\n".join(checks))
        result = {
            **environment(),
            "config_file": args.config,
            "overrides": [f"--{s}.{k} {v}" for s, k, v in overrides],
            "matmul_peak_tflops": peak,
            "rows": list(rows.values()),
            "dp_efficiency": scaling,
            "checks": checks,
        }
        print(f"wrote {write_result(result, 'train', args.out)}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
