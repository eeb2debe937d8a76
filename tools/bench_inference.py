"""Whole-model prefill time in sparse vs full inference mode, batch 1, at long contexts.

    python tools/bench_inference.py --config examples/ssa_1b_8k.yaml --seq-lens 32768 65536 131072

The model is the training stack's own (`transformer_config_of` + `build_model`, bf16, eval mode);
prefill here is the embedding and every transformer layer over the prompt (what fills the KV
cache). The output layer is left out: generation needs the last position's logits only, and
full-vocabulary logits for every prompt position are not part of prefill. Each mode is timed in
the same run (median of CUDA-event timings after warm-up); the project's speed-up targets are
printed with MISS where missed, and the result goes to benchmarks/results/ as JSON.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The project's targets: sparse-mode prefill speed-up over full mode, 1B model, batch 1.
SPEEDUP_TARGETS = {32768: 3.0, 65536: 5.0, 131072: 8.0}
# Kernel names of attention in either mode: cuDNN/flash SDPA, and the SSA kernels (kernels/ssa).
ATTENTION_KERNEL_MARKS = ("sdpa", "fmha", "flash", "attention", "_select_lse_kernel", "_select_topk_kernel",
                          "_block_keys_kernel", "_fwd_kernel")  # fmt: skip


def attention_ms(profile: dict[str, Any]) -> float:
    """Device time of the attention kernels in a ``kernel_profile`` (per call)."""
    return sum(k["ms"] for k in profile["top_kernels"]
               if any(mark in k["name"].lower() for mark in ATTENTION_KERNEL_MARKS))  # fmt: skip


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[tuple[str, str, str]]]:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0]
        + " Any training-config key can be overridden with --section.key value."
    )
    p.add_argument("--config", help="training YAML of the model, e.g. examples/ssa_1b_8k.yaml")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--vocab-size", type=int, default=128256, help="used when the config sets none")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", action="store_true",
                   help="also profile one prefill per mode and length: the attention kernels' share of the "
                   "time and the speed-up that free attention would give (the ceiling of the ratio)")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/prefill_<time>.json)")
    from ssa_megatron.training.config import parse_args_and_overrides

    args, overrides = parse_args_and_overrides(p, argv)
    if args.config is None:
        p.error("--config is required, e.g. --config examples/ssa_1b_8k.yaml")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args, overrides


def build_prefill_model(args: argparse.Namespace, overrides: list, device: Any) -> Any:
    import torch

    from ssa_megatron.model.gpt import build_model
    from ssa_megatron.parallel.state import initialize_parallel
    from ssa_megatron.training.config import load_config, transformer_config_of

    longest = max(args.seq_lens)
    cfg = load_config(args.config, [*overrides, ("data", "seq_length", str(longest))])
    vocab = cfg.model.vocab_size or args.vocab_size
    initialize_parallel(1, 1, 1, seed=cfg.train.seed)
    # No activation recomputation at inference (it would only re-run forward work under no_grad).
    config = transformer_config_of(cfg, device, recompute="none")
    model = build_model(config, vocab, longest, post_process=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), vocab


def run_prefill(model: Any, tokens: Any, positions: Any) -> None:
    import torch

    with torch.no_grad():
        model(tokens, positions, None)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    import torch

    from ssa_megatron.benchmarking import cuda_time_ms, environment, kernel_profile, write_result
    from ssa_megatron.model.mode import override_mode
    from ssa_megatron.training.launch import detect_launch, init_distributed, resolve_device

    device = resolve_device("auto")
    if device.type != "cuda":
        print("bench_inference: no CUDA GPU; this is a smoke run and its timings are not benchmark figures")
    init_distributed(detect_launch(), device)
    model, vocab = build_prefill_model(args, overrides, device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for t in args.seq_lens:
        tokens = torch.randint(0, vocab, (1, t), generator=gen).to(device)
        positions = torch.arange(t, device=device)[None]
        row: dict[str, Any] = {"T": t}
        for mode in ("full", "sparse"):
            prefill = partial(run_prefill, model, tokens, positions)
            with override_mode(model, inference_mode=mode):
                row[f"{mode}_ms"] = cuda_time_ms(prefill, args.reps, args.warmup)
                if args.profile:
                    profile = kernel_profile(prefill, steps=1, top=10_000)
                    row[f"{mode}_attention_ms"] = attention_ms(profile)
                    row[f"{mode}_busy_ms"] = profile["device_busy_ms"]
        row["speedup"] = row["full_ms"] / row["sparse_ms"]
        if args.profile:
            # Everything but attention runs in both modes alike: with attention free, sparse prefill would
            # take full_ms minus full's attention time, which bounds the ratio any attention kernel reaches.
            without_attention = row["full_ms"] - row["full_attention_ms"]
            row["speedup_ceiling_free_attention"] = row["full_ms"] / without_attention
        rows.append(row)
        print(row, flush=True)
    checks = []
    for row in rows:
        target = SPEEDUP_TARGETS.get(row["T"])
        if target is not None:
            ok = row["speedup"] >= target
            ceiling = row.get("speedup_ceiling_free_attention")
            checks.append(f"T={row['T']}: sparse prefill speed-up {row['speedup']:.2f}x (>= {target}x) "
                          f"{'ok' if ok else 'MISS'}"
                          + (f"; free attention would give {ceiling:.2f}x" if ceiling else ""))  # fmt: skip
    print("\n".join(checks))
    result = {
        **environment(),
        "config_file": args.config,
        "overrides": [f"--{s}.{k} {v}" for s, k, v in overrides],
        "block_size": model.config.block_size,
        "block_count": model.config.effective_inference_block_count,
        "rows": rows,
        "checks": checks,
    }
    print(f"wrote {write_result(result, 'prefill', args.out)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
