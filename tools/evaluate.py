"""Evaluate an SSA checkpoint (exported HF directory or Megatron training checkpoint) on validation data.

Writes results.json, report.md and PNG plots: perplexity in sparse and full mode with attention
sparsity/entropy/KL per layer, a block_count sweep, long-context extrapolation and passkey retrieval.

    python tools/evaluate.py --checkpoint out/hf --data val.npy --out eval/ --passkey-lengths 1024,4096
"""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", help="HF directory (config.json) or Megatron checkpoint dir (with `latest`)"
    )
    p.add_argument(
        "--data",
        help="validation data: a packed MDS split (or a data root with val/), a .npy of token ids, or a "
        "UTF-8 text file (needs a tokenizer)",
    )
    p.add_argument(
        "--tokenizer", help="tokenizer.json or sentencepiece .model (default: the one in --checkpoint)"
    )
    p.add_argument("--out", default="eval_results", help="output directory (default: %(default)s)")
    p.add_argument(
        "--run-name",
        help="run name in the report and in tools/compare_runs.py (default: the checkpoint's folder)",
    )
    p.add_argument("--seq-len", type=int, help="window length (default: the model's training length)")
    p.add_argument(
        "--max-windows", type=int, default=16, help="windows per measurement (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--block-count", type=int, help="sparse budget for the main measurements (default: config)"
    )
    p.add_argument(
        "--block-counts",
        type=_ints,
        default=[8, 16, 32, 64, 128, 256],
        help="comma list for the budget sweep; empty to skip (default: 8,...,256)",
    )
    p.add_argument(
        "--extrapolation-factors",
        type=_floats,
        default=[1, 2, 4],
        help="multiples of the training length; empty to skip (default: 1,2,4)",
    )
    p.add_argument(
        "--rope-scaling",
        choices=["none", "linear", "dynamic"],
        default="none",
        help="RoPE scaling used beyond the training length (default: %(default)s)",
    )
    p.add_argument(
        "--passkey-lengths", type=_ints, default=[], help="comma list of prompt lengths; empty skips"
    )
    p.add_argument("--passkey-depths", type=_floats, default=[0.1, 0.5, 0.9])
    p.add_argument("--passkey-trials", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    if not args.data:
        parser.error("--data is required")

    from pathlib import Path

    import torch

    from ssa_megatron.evaluation.compare import describe_checkpoint
    from ssa_megatron.evaluation.data import load_mds_batches, load_token_stream, mds_split_dir
    from ssa_megatron.evaluation.loading import find_tokenizer_file, load_eval_tokenizer, load_model
    from ssa_megatron.evaluation.runner import EvalOptions, run_evaluation

    overrides = {"block_count": args.block_count} if args.block_count else {}
    model, source = load_model(
        args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype), **overrides
    )
    tok_path = args.tokenizer or find_tokenizer_file(Path(source))
    tokenizer = load_eval_tokenizer(tok_path, model.config.vocab_size) if tok_path else None
    stream = load_token_stream(args.data, tokenizer)
    split = mds_split_dir(Path(args.data)) if Path(args.data).is_dir() else None
    # Packed validation rows are scored as training validation scores them (RoPE restarts per document).
    batches = load_mds_batches(split, args.batch_size, args.max_windows) if split else None
    options = EvalOptions(
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        block_counts=args.block_counts,
        extrapolation_factors=args.extrapolation_factors,
        rope_scaling=args.rope_scaling,
        passkey_lengths=args.passkey_lengths,
        passkey_depths=args.passkey_depths,
        passkey_trials=args.passkey_trials,
        seed=args.seed,
        progress=not args.no_progress,
    )
    results = run_evaluation(
        model,
        stream,
        options,
        args.out,
        encode=tokenizer.encode if tokenizer else None,
        batches=batches,
        checkpoint=describe_checkpoint(args.checkpoint, args.run_name),
    )
    for mode, res in results["perplexity"].items():
        att = res["attention"]["mean"]
        print(
            f"{mode:>6}: ppl {res['ppl']:.4f}  sparsity {att['sparsity']:.4f}  entropy {att['entropy']:.4f}"
        )
    print(f"report: {results['files']['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
