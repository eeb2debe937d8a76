"""Time the SSA kernels against PyTorch SDPA dense causal attention on one GPU.

For the 1B layout (32 query heads, 2 KV heads, head_dim 64, block_size 16, block_count 16,
batch 1) and each sequence length, one run times: SDPA dense causal fwd and fwd+bwd, our dense
path (kernels.ssa.dense_attention) fwd+bwd, block keys, selection, selected attention fwd and fwd+bwd,
the forward's loads alone (kernels/probes/gather_bound.py: the floor the K/V gather sets), the
whole sparse branch fwd+bwd, and flash-linear-attention's fla.ops.nsa where it is importable
and accepts the configuration. Each number is the median of repeated CUDA-event timings after
warm-up. Prints a table (MISS where a target is missed) and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The project's kernel targets: sparse branch fwd+bwd / dense SDPA fwd+bwd, and selected-attention fwd rate.
RATIO_TARGETS = {8192: 0.25, 32768: 0.12, 65536: 0.09}
RATE_TARGET_T, RATE_TARGET_TFLOPS = 65536, 150.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--block-count", type=int, default=16)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernels_<date>.json)"
    )
    p.add_argument("--skip-fla", action="store_true", help="do not try fla.ops.nsa")
    args = p.parse_args(argv)
    if args.q_heads % args.kv_heads:
        p.error(f"--q-heads {args.q_heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args


def bench_one(args: argparse.Namespace, t: int, fla_nsa: Callable | None) -> dict:
    import torch

    from kernels import ssa
    from kernels.probes.gather_bound import gathered_sums
    from kernels.ssa._plan import make_plan
    from kernels.ssa.selected_attention_kernel import default_launch
    from ssa_megatron.benchmarking import (
        attention_inputs,
        cuda_time_ms,
        dense_sdpa_calls,
        input_grads,
        sparse_branch_fwdbwd,
        sparse_over_dense_device,
    )

    hq, h, d, bs, bc = args.q_heads, args.kv_heads, args.head_dim, args.block_size, args.block_count
    dev, dt = "cuda", torch.bfloat16
    q, k, v, do = attention_inputs(t, hq, h, d, dev)
    time = lambda fn: cuda_time_ms(fn, args.reps, args.warmup)
    row: dict = {"T": t}

    sdpa, sdpa_fwdbwd = dense_sdpa_calls(q, k, v, do)
    with torch.no_grad():
        row["sdpa_fwd_ms"] = time(sdpa)
    row["sdpa_fwdbwd_ms"] = time(sdpa_fwdbwd)

    def ours_dense() -> None:
        input_grads(ssa.dense_attention(q, k, v)[0], (q, k, v), do)

    row["ours_dense_fwdbwd_ms"] = time(ours_dense)

    with torch.no_grad():
        row["block_keys_ms"] = time(lambda: ssa.block_keys(k, bs))
        kb = ssa.block_keys(k, bs)
        row["selection_ms"] = time(lambda: ssa.select_blocks(q, kb, bs, bc))
        idx = ssa.select_blocks(q, kb, bs, bc)
        row["sel_attn_fwd_ms"] = time(lambda: ssa.selected_attention(q, k, v, idx, bs))
        # The forward's loads alone (same grid and launch, no math): the floor the gather sets.
        plan, launch = make_plan(None, 1, t, 0, t, bs, q.device), default_launch(d, hq // h)
        idx_c = idx.contiguous()
        row["sel_attn_gather_ms"] = time(lambda: gathered_sums(k, v, idx_c, bs, 0, plan, launch))
    sel_attn = lambda: ssa.selected_attention(q, k, v, idx, bs)[0]
    row["sel_attn_fwdbwd_ms"] = time(lambda: input_grads(sel_attn(), (q, k, v), do))
    row["sparse_fwdbwd_ms"] = time(sparse_branch_fwdbwd(q, k, v, do, bs, bc))
    flops = 4 * t * bc * bs * d * hq
    row["sel_attn_fwd_tflops"] = flops / (row["sel_attn_fwd_ms"] * 1e-3) / 1e12
    # K and V rows of every selected block (the own block's rows past the query are masked, not read).
    gathered_bytes = 2 * t * h * bc * bs * d * q.element_size()
    row["sel_attn_gather_tb_s"] = gathered_bytes / (row["sel_attn_gather_ms"] * 1e-3) / 1e12
    row["sel_attn_fwd_tflops_gather_ceiling"] = flops / (row["sel_attn_gather_ms"] * 1e-3) / 1e12
    row["sparse_over_dense_fwdbwd"] = row["sparse_fwdbwd_ms"] / row["sdpa_fwdbwd_ms"]
    row |= sparse_over_dense_device(q, k, v, do, bs, bc, args.reps)

    if fla_nsa is not None:
        idx64 = idx.long()
        for name, kwargs in {
            # Selected attention alone, on our selections (no compression branch).
            "fla_sel_attn": {"block_indices": idx64, "block_counts": bc, "block_size": bs},
            # The full NSA path (compression + top-k + selection), at our block_size and at its default.
            "fla_nsa_full_bs16": {"g_cmp": torch.ones(1, t, hq, device=dev, dtype=dt), "block_counts": bc,
                                  "block_size": bs},
            "fla_nsa_full_bs64": {"g_cmp": torch.ones(1, t, hq, device=dev, dtype=dt), "block_counts": bc,
                                  "block_size": 64},
        }.items():  # fmt: skip
            try:
                run = lambda kw=kwargs: fla_nsa(q, k, v, **kw)
                with torch.no_grad():
                    row[f"{name}_fwd_ms"] = time(run)
                row[f"{name}_fwdbwd_ms"] = time(lambda r=run: input_grads(r(), (q, k, v), do))
            except Exception as exc:
                row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    torch.cuda.empty_cache()
    return row


def verdicts(row: dict) -> list[str]:
    out = []
    t = row["T"]
    if t in RATIO_TARGETS:
        ok = row["sparse_over_dense_fwdbwd"] <= RATIO_TARGETS[t]
        ratio = row["sparse_over_dense_fwdbwd"]
        verdict = f"ratio {ratio:.3f} vs <= {RATIO_TARGETS[t]}: {'ok' if ok else 'MISS'}"
        if not ok:
            # Which term limits it: the quadratic scoring pass (selection) or the attention's gathers.
            rest = (row["sparse_fwdbwd_ms"] - row["selection_ms"]) / row["sdpa_fwdbwd_ms"]
            verdict += (f" (selection {row['selection_ms'] / row['sparse_fwdbwd_ms']:.0%} of the branch; "
                        f"without it {rest:.3f})")  # fmt: skip
        out.append(verdict)
    if t == RATE_TARGET_T:
        ok = row["sel_attn_fwd_tflops"] >= RATE_TARGET_TFLOPS
        out.append(f"sel-attn fwd {row['sel_attn_fwd_tflops']:.0f} TFLOP/s vs >= {RATE_TARGET_TFLOPS:.0f}: "
                   f"{'ok' if ok else 'MISS'} (its loads alone allow "
                   f"{row['sel_attn_fwd_tflops_gather_ceiling']:.0f})")  # fmt: skip
    return out


def misses(rows: list[dict]) -> list[str]:
    """Every missed target of `rows`, as 'T=<len>: <verdict>'."""
    return [f"T={r['T']}: {v}" for r in rows for v in verdicts(r) if ": MISS" in v]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (run it on a machine with one)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    fla_nsa, fla_note = None, "skipped (--skip-fla)"
    if not args.skip_fla:
        try:
            import fla
            from fla.ops.nsa import parallel_nsa

            fla_nsa, fla_note = parallel_nsa, f"fla-core {getattr(fla, '__version__', '?')}"
        except Exception as exc:
            fla_note = f"fla.ops.nsa not importable: {type(exc).__name__}: {exc}"
    print(f"fla: {fla_note}", flush=True)
    from ssa_megatron.benchmarking import environment, write_result

    rows: list[dict] = []
    result = {
        **environment(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dtype": "bfloat16",
        "dense_baseline": "torch SDPA is_causal, K/V expanded to the query heads outside the timed region",
        "fla": fla_note,
        "targets": {
            "sparse_over_dense_fwdbwd": RATIO_TARGETS,
            "sel_attn_fwd_tflops_at_64k": RATE_TARGET_TFLOPS,
        },
        "rows": rows,
        "misses": [],
    }
    out = args.out
    for t in args.seq_lens:
        rows.append(bench_one(args, t, fla_nsa))
        print(json.dumps(rows[-1]), flush=True)
        result["misses"] = misses(rows)
        # Rewritten after every length: a run cut short by a time limit keeps what it measured.
        out = write_result(result, "kernels", out)

    cols = ["T", "sdpa_fwd_ms", "sdpa_fwdbwd_ms", "ours_dense_fwdbwd_ms", "block_keys_ms", "selection_ms",
            "sel_attn_fwd_ms", "sel_attn_gather_ms", "sel_attn_fwdbwd_ms", "sparse_fwdbwd_ms",
            "sparse_over_dense_fwdbwd", "sparse_over_dense_device", "sel_attn_fwd_tflops",
            "sel_attn_gather_tb_s", "fla_sel_attn_fwdbwd_ms", "fla_nsa_full_bs16_fwdbwd_ms",
            "fla_nsa_full_bs64_fwdbwd_ms"]  # fmt: skip
    print("\n" + " | ".join(cols))
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in cols]
        print(" | ".join(cells) + ("   " + "; ".join(verdicts(row)) if verdicts(row) else ""))
    for row in rows:
        for key, val in row.items():
            if key.endswith("_error"):
                print(f"T={row['T']} {key}: {val}")
    missed = result["misses"]
    print("\n" + ("MISSED TARGETS:\n  " + "\n  ".join(missed) if missed else "all targets met"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
