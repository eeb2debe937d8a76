"""Whole-model prefill time in sparse vs full inference mode, batch 1, at long contexts.

    python tools/bench_inference.py --config examples/ssa_1b_8k.yaml --seq-lens 32768 65536 131072

The model is the training stack's own (`transformer_config_of` + `build_model`, bf16, eval mode);
prefill here is the embedding and every transformer layer over the prompt (what fills the KV
cache). The output layer is left out: generation needs the last position's logits only, and
full-vocabulary logits for every prompt position are not part of prefill. Each mode is timed in
the same run (median of CUDA-event timings after warm-up); the project's speed-up targets are
printed with MISS where missed, and the result goes to benchmarks/results/ as JSON. With
``--profile`` each prefill is also split by phase (selection, sparse attention, dense attention,
non-attention: kernel time by kernel name), so the free-attention cap, the non-attention time
against its FLOPs at the measured matmul peak and the selection's share come from the same run.

    python tools/bench_inference.py --config examples/ssa_1b_8k.yaml --decode 16x32768 16x131072 1x131072

``--decode BATCHxCONTEXT ...`` times one decoding step of the Hugging Face model (same shape, random
bf16 weights) per mode at each batch and context: a preallocated cache (``SSAStaticCache``) filled
with random keys/values, the step captured in a CUDA graph (so launches do not hide the reads), full
mode reading the whole cache (``kernels.ssa.dense_decode``, split over the keys), sparse mode the
block keys and the selected blocks (``kernels.ssa.sparse_decode``), with the bytes each mode's
attention reads per step.
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
# Prefill phases by kernel name (first match wins, so dense attention comes before the SSA forward:
# flash's own forward is named flash_fwd_kernel); everything else is non-attention work.
PHASE_MARKS = (
    ("selection", ("_select_lse_kernel", "_select_topk_kernel", "_block_keys_kernel")),
    ("dense_attention", ("sdpa", "fmha", "flash", "attention")),
    ("sparse_attention", ("_fwd_kernel",)),
)
# Prefill targets at 64k/128k: sparse speed-up as a share of the free-attention cap, non-attention time
# against its FLOPs at the measured matmul peak, and the selection's share of sparse prefill at 128k.
CAP_SHARE_TARGET = 0.85
NON_ATTENTION_FLOP_TARGET = 1.3
SELECTION_SHARE_TARGET = 0.15
# Decoding step time full / sparse at (batch, context), and attention bytes read vs the minimum.
DECODE_TARGETS = {(16, 32768): 2.5, (16, 131072): 5.0, (1, 131072): 1.5}
DECODE_BYTES_TARGET = 1.5


def attention_ms(profile: dict[str, Any]) -> float:
    """Device time of the attention kernels in a ``kernel_profile`` (per call)."""
    return sum(k["ms"] for k in profile["top_kernels"]
               if any(mark in k["name"].lower() for mark in ATTENTION_KERNEL_MARKS))  # fmt: skip


def phase_ms(profile: dict[str, Any]) -> dict[str, float]:
    """Device time per call of each prefill phase in a ``kernel_profile`` (non-attention: the rest)."""
    phases = {name: 0.0 for name, _ in PHASE_MARKS}
    rest = 0.0
    for k in profile["top_kernels"]:
        name = k["name"].lower()
        phase = next((p for p, marks in PHASE_MARKS if any(m in name for m in marks)), None)
        if phase is None:
            rest += k["ms"]
        else:
            phases[phase] += k["ms"]
    return {**phases, "non_attention": rest}


def parse_case(text: str) -> tuple[int, int]:
    """``"16x32768"`` -> (batch 16, context 32768)."""
    batch, sep, context = text.lower().partition("x")
    if not sep or not batch.isdigit() or not context.isdigit() or int(batch) < 1 or int(context) < 2:
        raise ValueError(f"--decode takes BATCHxCONTEXT, e.g. 16x32768; got {text!r}")
    return int(batch), int(context)


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
                   "time and the speed-up that free attention would give (the ceiling of the ratio); with "
                   "--decode, the top kernels of one step per mode")
    p.add_argument("--decode", nargs="+", metavar="BATCHxCONTEXT",
                   help="time one decoding step per mode at these batch sizes and contexts (e.g. 16x32768) "
                   "instead of prefill")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/prefill_<time>.json, "
                   "decode_<time>.json with --decode)")  # fmt: skip
    from ssa_megatron.training.config import parse_args_and_overrides

    args, overrides = parse_args_and_overrides(p, argv)
    if args.config is None:
        p.error("--config is required, e.g. --config examples/ssa_1b_8k.yaml")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    if args.decode:
        try:
            args.decode = [parse_case(c) for c in args.decode]
        except ValueError as exc:
            p.error(str(exc))
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


def non_attention_flops(config: Any, seq: int) -> float:
    """Matmul FLOPs of prefill outside attention: QKV, gate, output projection and MLP of every layer."""
    h = config.hidden_size
    d = config.kv_channels or h // config.num_attention_heads
    hq, hkv = config.num_attention_heads, config.num_query_groups
    attention_projections = 2 * h * (hq * d + 2 * hkv * d) + 2 * h * hq + 2 * hq * d * h
    per_token = attention_projections + 2 * 3 * h * config.ffn_hidden_size
    return float(config.num_layers * per_token * seq)


def run_prefill(model: Any, tokens: Any, positions: Any) -> None:
    import torch

    with torch.no_grad():
        model(tokens, positions, None)


def hf_config(args: argparse.Namespace, overrides: list) -> Any:
    """The Hugging Face config of the training config's model (same shape and SSA settings)."""
    from ssa_megatron.hf.configuration_ssa import SSAConfig
    from ssa_megatron.training.config import load_config

    m = load_config(args.config, overrides).model
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    return SSAConfig(
        vocab_size=m.vocab_size or args.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups, head_dim=head_dim,
        rms_norm_eps=m.norm_epsilon, rope_theta=m.rotary_base, block_size=m.block_size,
        block_count=m.effective_inference_block_count, tie_word_embeddings=m.tie_embeddings,
        max_position_embeddings=max(c for _, c in args.decode),
    )  # fmt: skip


def time_decode_step(
    model: Any, cache: Any, context: int, mode: str, reps: int, warmup: int, profile: bool = False
) -> dict[str, Any]:
    """One step at ``context`` tokens (the new token's included): eager and CUDA-graph times (ms), and
    with ``profile`` the device busy time and top kernels of one eager step."""
    import torch

    from ssa_megatron.benchmarking import cuda_time_ms, kernel_profile

    batch = cache.keys[0].shape[0]
    token = torch.zeros(batch, 1, dtype=torch.long, device=cache.keys[0].device)

    def step() -> None:
        cache.set_length(context - 1)
        with torch.no_grad():
            model(token, past_key_values=cache, use_cache=True, attention_mode=mode)

    step()  # compiles the kernels; in sparse mode also builds the layers' block keys once
    row: dict[str, Any] = {"eager_ms": cuda_time_ms(step, reps, warmup)}
    if profile:
        prof = kernel_profile(step, steps=1, top=12)
        row["busy_ms"] = prof["device_busy_ms"]
        row["top_kernels"] = prof["top_kernels"]
    if torch.cuda.is_available():
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            step()
        row["graph_ms"] = cuda_time_ms(graph.replay, reps, warmup)
        del graph
    row["ms"] = row.get("graph_ms", row["eager_ms"])
    return row


def run_decode(args: argparse.Namespace, overrides: list, device: Any) -> dict[str, Any]:
    import torch

    from kernels.ssa.decode_kernel import decode_read_bytes
    from ssa_megatron.hf.modeling_ssa import SSAForCausalLM, SSAStaticCache

    config = hf_config(args, overrides)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = SSAForCausalLM(config).to(device=device, dtype=dtype).eval()
    if device.type == "cuda":
        import kernels.ssa

        model.set_attention_ops(kernels.ssa)
    h, d = config.num_key_value_heads, config.head_dim
    g = config.num_attention_heads // h
    rows, checks = [], []
    for batch, context in args.decode:
        cache = SSAStaticCache(config, batch, context, device=device, dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(context)
        for layer in range(config.num_hidden_layers):
            cache.keys[layer].normal_(generator=gen)
            cache.values[layer].normal_(generator=gen)
        row: dict[str, Any] = {"batch": batch, "context": context}
        for mode in ("full", "sparse"):
            timed = time_decode_step(model, cache, context, mode, args.reps, args.warmup, args.profile)
            row.update({f"{mode}_{k}": v for k, v in timed.items()})
        row["full_over_sparse"] = row["full_ms"] / row["sparse_ms"]
        per_layer = decode_read_bytes(batch, context, h, g, d, config.block_size, config.block_count,
                                      dtype.itemsize)  # fmt: skip
        row["attention_bytes_per_step"] = {k: v * config.num_hidden_layers for k, v in per_layer.items()}
        row["sparse_bytes_over_minimum"] = per_layer["kernels"] / per_layer["minimum"]
        rows.append(row)
        print(row, flush=True)
        where = f"decode batch {batch} context {context}"
        target = DECODE_TARGETS.get((batch, context))
        if target is not None:
            ratio = row["full_over_sparse"]
            verdict = "ok" if ratio >= target else "MISS"
            checks.append(f"{where}: full/sparse step {ratio:.2f}x (>= {target}x) {verdict}")
        ratio = row["sparse_bytes_over_minimum"]
        verdict = "ok" if ratio <= DECODE_BYTES_TARGET else "MISS"
        bound = DECODE_BYTES_TARGET
        checks.append(f"{where}: sparse attention bytes {ratio:.2f}x the minimum (<= {bound}x) {verdict}")
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(checks))
    return {"config_file": args.config, "overrides": [f"--{s}.{k} {v}" for s, k, v in overrides],
            "block_size": config.block_size, "block_count": config.block_count, "rows": rows,
            "checks": checks}  # fmt: skip


def prefill_checks(row: dict[str, Any], peak: float | None) -> list[str]:
    """The per-phase targets of one profiled prefill row."""
    out, t = [], row["T"]
    if t >= 65536:
        share = row["speedup_share_of_cap"]
        out.append(f"T={t}: sparse speed-up {share:.2f} of its free-attention cap (>= {CAP_SHARE_TARGET}) "
                   f"{'ok' if share >= CAP_SHARE_TARGET else 'MISS'}")  # fmt: skip
        if peak:
            ratio = row["non_attention_over_flops"]
            ok = ratio <= NON_ATTENTION_FLOP_TARGET
            out.append(f"T={t}: non-attention time {ratio:.2f}x its FLOPs at the measured matmul peak "
                       f"(<= {NON_ATTENTION_FLOP_TARGET}x) {'ok' if ok else 'MISS'}")  # fmt: skip
    if t >= 131072:
        share = row["selection_share_of_sparse"]
        out.append(f"T={t}: selection {share:.1%} of sparse prefill (<= {SELECTION_SHARE_TARGET:.0%}) "
                   f"{'ok' if share <= SELECTION_SHARE_TARGET else 'MISS'}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    import torch

    from ssa_megatron.benchmarking import (
        cuda_time_ms,
        environment,
        kernel_profile,
        measured_matmul_tflops,
        write_result,
    )
    from ssa_megatron.model.mode import override_mode
    from ssa_megatron.training.launch import detect_launch, init_distributed, resolve_device

    device = resolve_device("auto")
    if device.type != "cuda":
        print("bench_inference: no CUDA GPU; this is a smoke run and its timings are not benchmark figures")
    if args.decode:
        result = {**environment(), **run_decode(args, overrides, device)}
        print(f"wrote {write_result(result, 'decode', args.out)}")
        return 0
    init_distributed(detect_launch(), device)
    model, vocab = build_prefill_model(args, overrides, device)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    phase_checks: list[str] = []
    # The bf16 matmul rate of this GPU, measured in this run: the peak the non-attention work is held to.
    peak = measured_matmul_tflops() if args.profile and device.type == "cuda" else None
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
                    row[f"{mode}_phases_ms"] = phase_ms(profile)
        row["speedup"] = row["full_ms"] / row["sparse_ms"]
        if args.profile:
            # Everything but attention runs in both modes alike: with attention free, sparse prefill would
            # take full_ms minus full's attention time, which bounds the ratio any attention kernel reaches.
            without_attention = row["full_ms"] - row["full_attention_ms"]
            row["speedup_ceiling_free_attention"] = row["full_ms"] / without_attention
            row["speedup_share_of_cap"] = row["speedup"] / row["speedup_ceiling_free_attention"]
            row["selection_share_of_sparse"] = row["sparse_phases_ms"]["selection"] / row["sparse_ms"]
            if peak:
                row["non_attention_flops"] = non_attention_flops(model.config, t)
                ideal_ms = row["non_attention_flops"] / (peak * 1e12) * 1e3
                row["non_attention_ideal_ms"] = ideal_ms
                row["non_attention_over_flops"] = row["full_phases_ms"]["non_attention"] / ideal_ms
            phase_checks.extend(prefill_checks(row, peak))
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
    checks.extend(phase_checks)
    print("\n".join(checks))
    result = {
        "matmul_peak_tflops_measured": peak,
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
