"""Time launch parameters of the SSA kernels (selection passes, selected-attention forward, dq, dk/dv).

    python tools/sweep_selected_attention.py --seq-lens 8192 65536

For one layout (default: the 1B model's 32 query heads, 2 KV heads, head_dim 64, block_size 16,
block_count 16, bf16, batch 1) and each length, every launch of a grid is timed per kernel (median of
CUDA-event timings after warm-up) next to the shipped one (`default_launch` in
kernels/ssa/selected_attention_kernel.py, `default_select_launch` in kernels/ssa/selection_kernel.py),
and its output is compared with the shipped launch's: relative error by the norm (floats), or the
fraction of rows that differ (selected indices; fp32 summation order may flip near-ties). A launch
the GPU refuses (e.g. too much shared memory) is a row with its error. Prints the fastest launch per
kernel and length and writes JSON to benchmarks/results/. The shipped launches came from such runs
on an H200; rerun it on another GPU to check them.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

LAYOUT_ARGS = ("q_heads", "kv_heads", "head_dim", "block_size", "block_count")
# Per kernel, named grids of the Launch fields swept and their values (each grid a product).
# "registers" caps the registers per thread (None: uncapped) at the steps where one more program
# fits on an SM (sm90 compiles of the 1B layout, uncapped: the forward uses 150 registers on 1 warp,
# dq 137 on 2, pass 2 of the selection 136 on 1, pass 1 95 on 4; dk/dv is held to 3 programs per SM
# by the shared memory of its 3 stages, so its caps come with 2 stages).
GRIDS = {
    "fwd": {
        "shape": {"fwd_warps": (1, 2, 4), "fwd_stages": (1, 2, 3), "fwd_keys": (32, 64, 128)},
        "registers": {"fwd_maxnreg": (128, 112, 104)},
    },
    "dq": {
        "shape": {"dq_warps": (2, 4, 8), "dq_stages": (1, 2, 3), "dq_keys": (32, 64, 128)},
        "registers": {"dq_maxnreg": (None, 128, 112)},
    },
    "dkdv": {
        "shape": {"dkdv_warps": (2, 4, 8), "dkdv_stages": (1, 2, 3), "dkdv_rows": (16, 32, 64, 128)},
        "registers": {"dkdv_stages": (2,), "dkdv_maxnreg": (128, 96)},
    },
    "select_lse": {
        "shape": {"lse_rows": (64, 128), "lse_blocks": (32, 64, 128), "lse_warps": (4, 8)},
        "registers": {"lse_maxnreg": (80, 64)},
    },
    "select_topk": {
        "shape": {"topk_rows": (32, 16, 64), "topk_blocks": (32, 16, 64), "topk_warps": (1, 2, 4)},
        "registers": {"topk_maxnreg": (None, 128, 120)},
    },
}
GRID_NAMES = ("shape", "registers")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 65536])
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--block-count", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--kernels", nargs="+", choices=sorted(GRIDS), default=sorted(GRIDS),
                   help="which kernels' launches to time (default: all)")
    p.add_argument("--grids", nargs="+", choices=GRID_NAMES, default=list(GRID_NAMES),
                   help="which grids of each kernel to time (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="only the first two launches of each grid (smoke runs under TRITON_INTERPRET=1)")
    p.add_argument("--out", type=Path,
                   help="JSON path (default benchmarks/results/sweep_selected_attention_<time>.json)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    if args.q_heads % args.kv_heads:
        p.error(f"--q-heads {args.q_heads} must be a multiple of --kv-heads {args.kv_heads}")
    return args


def launches(kernel: str, grids: list[str], quick: bool) -> list[dict[str, Any]]:
    out = []
    for name in grids:
        fields = GRIDS[kernel][name]
        out += [dict(zip(fields, values, strict=True)) for values in itertools.product(*fields.values())]
    return out[:2] if quick else out


def shipped_launches(head_dim: int, group_size: int) -> dict[str, Any]:
    """Per kernel, the launch parameters it ships with for this layout."""
    from kernels.ssa.selected_attention_kernel import default_launch
    from kernels.ssa.selection_kernel import default_select_launch

    attention, selection = default_launch(head_dim, group_size), default_select_launch(head_dim, group_size)
    return {kernel: selection if kernel.startswith("select") else attention for kernel in GRIDS}


def difference(out: Any, reference: Any) -> dict[str, float]:
    """How a launch's output differs from the shipped launch's."""
    import torch

    if not out.is_floating_point():
        return {"rows_differing_vs_shipped": (out != reference).flatten(0, -2).any(-1).float().mean().item()}
    finite = torch.isfinite(reference)
    if not torch.equal(torch.isfinite(out), finite):
        return {"rel_err_vs_shipped": float("inf")}
    a, b = out[finite].double(), reference[finite].double()
    return {"rel_err_vs_shipped": ((a - b).norm() / b.norm()).item()}


def kernel_calls(args: argparse.Namespace, t: int, device: Any) -> dict[str, Callable[[Any], Any]]:
    """Per kernel, a function of its launch that runs it once on fixed inputs and returns its output."""
    import torch

    from kernels import ssa
    from kernels.ssa import selected_attention_kernel as sak
    from kernels.ssa import selection_kernel as sk
    from kernels.ssa._plan import make_plan
    from kernels.ssa.segment_table import segment_table

    gen = torch.Generator(device=device).manual_seed(t)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads = (args.q_heads, args.kv_heads, args.kv_heads, args.q_heads)
    q, k, v, do = (torch.randn(1, t, n, args.head_dim, device=device, generator=gen).to(dtype) for n in heads)
    bs, scale = args.block_size, args.head_dim**-0.5
    plan = make_plan(None, 1, t, 0, t, bs, q.device)
    _, _, idx = ssa.sparse_attention(q, k, v, bs, args.block_count, backend="triton")
    idx = idx.contiguous()
    shipped = shipped_launches(args.head_dim, args.q_heads // args.kv_heads)
    o, lse = sak._forward(q, k, v, idx, bs, 0, scale, plan, shipped["fwd"])
    _, delta = sak._dq(q, k, v, idx, o, lse, do, None, bs, 0, scale, plan, shipped["dq"])
    # Built once: the segment table does not depend on the launch (and its small ops would make the
    # dk/dv timing host-bound).
    table = segment_table(idx, plan, args.kv_heads)
    kb = ssa.block_keys(k, bs, backend="triton")
    lse_sel = sk._selection_lse(q, kb, bs, 0, scale, plan, shipped["select_lse"])
    return {
        "select_lse": lambda launch: sk._selection_lse(q, kb, bs, 0, scale, plan, launch),
        "select_topk": lambda launch: sk._selection_topk(
            q, kb, lse_sel, bs, args.block_count, 0, scale, plan, launch
        ),
        "fwd": lambda launch: sak._forward(q, k, v, idx, bs, 0, scale, plan, launch)[0],
        "dq": lambda launch: sak._dq(q, k, v, idx, o, lse, do, None, bs, 0, scale, plan, launch)[0],
        "dkdv": lambda launch: torch.cat(
            sak._dkdv(q, k, v, table, lse, delta, do, bs, 0, scale, plan, launch)
        ),
    }


def sweep_length(args: argparse.Namespace, t: int, device: Any) -> list[dict[str, Any]]:
    from ssa_megatron.benchmarking import cuda_time_ms

    shipped_by_kernel = shipped_launches(args.head_dim, args.q_heads // args.kv_heads)
    rows = []
    for kernel, call in kernel_calls(args, t, device).items():
        if kernel not in args.kernels:
            continue
        shipped = shipped_by_kernel[kernel]
        reference = call(shipped)
        shipped_ms = cuda_time_ms(partial(call, shipped), args.reps, args.warmup)
        for fields in launches(kernel, args.grids, args.quick):
            launch = dataclasses.replace(shipped, **fields)
            row: dict[str, Any] = {"T": t, "kernel": kernel, "launch": fields, "shipped_ms": shipped_ms}
            try:
                row |= difference(call(launch), reference)  # compiles it, too
                row["ms"] = cuda_time_ms(partial(call, launch), args.reps, args.warmup)
            except Exception as error:  # a launch the GPU refuses is a result, not a crash
                row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            rows.append(row)
            print(row, flush=True)
    return rows


def fastest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[tuple[int, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["T"], row["kernel"])
        if "ms" in row and (key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
    return list(best.values())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from ssa_megatron.benchmarking import environment, write_result

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device = torch.device("cpu")
        print("sweep_selected_attention: Triton interpreter on CPU; a smoke run, not benchmark figures")
    else:
        print("sweep_selected_attention needs a CUDA GPU (or TRITON_INTERPRET=1 for a smoke run)",
              file=sys.stderr)
        return 2
    rows = [row for t in args.seq_lens for row in sweep_length(args, t, device)]
    shipped = shipped_launches(args.head_dim, args.q_heads // args.kv_heads)
    best = fastest(rows)
    for row in best:
        print(f"T={row['T']} {row['kernel']}: fastest {row['launch']} {row['ms']:.4f} ms "
              f"(shipped {row['shipped_ms']:.4f} ms)")  # fmt: skip
    result = {
        **environment(),
        "layout": {k: getattr(args, k) for k in LAYOUT_ARGS},
        "shipped_launch": {k: dataclasses.asdict(v) for k, v in shipped.items()},
        "rows": rows,
        "fastest": best,
    }
    print(f"wrote {write_result(result, 'sweep_selected_attention', args.out)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
