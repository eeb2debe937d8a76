"""Training throughput of the whole stack on GPUs, each attention mode timed in the same run (issue 8).

    torchrun --nproc-per-node 1 tools/bench_train.py --config examples/ssa_1b_8k.yaml --modes full ssa
    torchrun --nproc-per-node 4 tools/bench_train.py --config examples/ssa_1b_8k.yaml --modes ssa \
        --compare-to benchmarks/results/train_<1-gpu run>.json        # data-parallel scaling
    torchrun --nproc-per-node 2 tools/bench_train.py --config ... --parallel.context 2 --data.seq_length 32768

For every mode the model is built through the training stack itself (`runner.build_engine`:
megatron DDP, distributed optimizer, bf16 with fp32 master weights) and fed synthetic token
batches of the configured shape. Two measurements, each the median of CUDA-event timings after
warm-up: the forward+backward of one global batch without the optimizer (the figure the SSA
authors' 1B measurement reports), and the whole step with the optimizer. Also: tokens/s per GPU,
model TFLOP/s per GPU counting only the main path (full-attention FLOPs, as MFU does) and
counting every branch that runs, the bf16 matmul rate measured on this GPU, and peak memory.
Prints a table with the issue's targets (MISS where missed) and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Issue 8 targets (H100, bf16, 1B layout, seq 8192, batch 1).
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


def bench_mode(
    args: argparse.Namespace, overrides: list, mode: str, world: int, device: Any
) -> dict[str, Any]:
    import torch

    from ssa_megatron.benchmarking import cuda_times_ms, kernel_profile
    from ssa_megatron.training.config import data_parallel_size, load_config
    from ssa_megatron.training.flops import training_flops_per_sequence
    from ssa_megatron.training.loop import drawn_modes, train_step
    from ssa_megatron.training.runner import build_engine

    cfg0 = load_config(args.config, [*overrides, ("model", "attention_mode", mode)])
    dp = data_parallel_size(cfg0, world)
    gbs = cfg0.train.micro_batch_size * dp * args.accum
    cfg = load_config(
        args.config,
        [*overrides, ("model", "attention_mode", mode), ("train", "global_batch_size", str(gbs))],
    )
    vocab = cfg.model.vocab_size or args.vocab_size
    engine = build_engine(cfg, vocab, device)
    batches = synthetic_batches(cfg, vocab, args.accum, seed=1234)
    iteration = [0]

    def fwd_bwd() -> None:
        iteration[0] += 1
        engine.forward_backward(iteration[0], batches, forward_only=False)

    def full_step() -> None:
        iteration[0] += 1
        train_step(engine, iteration[0], batches)

    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    fwd_bwd_samples = cuda_times_ms(fwd_bwd, args.reps, args.warmup)
    first_step = iteration[0] + args.warmup + 1
    step_samples = cuda_times_ms(full_step, args.reps, args.warmup)
    fwd_bwd_ms, step_ms = statistics.median(fwd_bwd_samples), statistics.median(step_samples)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None

    seq = cfg.data.seq_length
    seqs_per_gpu = cfg.train.micro_batch_size * args.accum / (cfg.parallel.tensor * cfg.parallel.context)
    seqs_per_gpu *= 1 / cfg.parallel.pipeline
    tokens_per_gpu = seqs_per_gpu * seq
    main_path = dataclasses.replace(cfg.model, attention_mode="full")
    flops_main = training_flops_per_sequence(main_path, seq, vocab, cfg.train.recompute) * seqs_per_gpu
    flops_all = training_flops_per_sequence(cfg.model, seq, vocab, cfg.train.recompute) * seqs_per_gpu
    row = {
        "mode": mode,
        "world_size": world,
        "data_parallel": dp,
        "tensor": cfg.parallel.tensor,
        "context": cfg.parallel.context,
        "pipeline": cfg.parallel.pipeline,
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
        "peak_memory_gib": peak_gib,
        "fwd_bwd_ms_samples": fwd_bwd_samples,
        "step_ms_samples": step_samples,
    }
    # The branch that drove each timed step's micro-batches (in ssa mode both branches always run).
    row["step_main_branches"] = [
        drawn_modes(engine.model_config, it, args.accum) for it in range(first_step, first_step + args.reps)
    ]
    if args.profile:
        row["profile_fwd_bwd"] = kernel_profile(fwd_bwd, args.profile)
        row["profile_step"] = kernel_profile(full_step, args.profile)
    return row


def release_model() -> None:
    """Free the last mode's model and parallel state so the next mode starts from the same memory."""
    import torch

    from ssa_megatron.parallel import destroy_parallel

    destroy_parallel()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def profile_summary(label: str, profile: dict[str, Any], top: int = 5) -> str:
    """One paragraph of a ``kernel_profile``: busy vs wall, the heaviest kernels, the host waits."""
    lines = [f"{label}: device busy {profile['device_busy_ms']:.1f} of {profile['wall_ms']:.1f} ms wall"]
    for kernel in profile["top_kernels"][:top]:
        lines.append(f"    {kernel['ms']:8.2f} ms  x{kernel['launches']:<4} {kernel['name'][:90]}")
    waits = ", ".join(f"{w['name']} x{w['calls']:g}" for w in profile["host_waits"])
    lines.append(f"    host waits: {waits or 'none'}")
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
    rows = {}
    for mode in args.modes:
        rows[mode] = bench_mode(args, overrides, mode, env.world_size, device)
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
