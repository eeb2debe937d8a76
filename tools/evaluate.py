"""Evaluate an SSA checkpoint (exported HF directory or Megatron training checkpoint) on validation data.

Writes results.json, report.md and PNG plots: perplexity in sparse and full mode with attention
sparsity/entropy/KL per layer, a block_count sweep, long-context extrapolation and passkey retrieval.

    python tools/evaluate.py --checkpoint out/hf --data val.npy --out eval/ --passkey-lengths 1024,4096

Standard benchmarks through lm-evaluation-harness (the `lmeval` extra) on an exported HF directory, in
sparse and full mode, into lm_eval.json (--data is then optional):

    python tools/evaluate.py --checkpoint out/hf --out eval/ --lm-eval-tasks hellaswag,arc_easy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssa_megatron.convert.cli import DAMAGED, USAGE, fail
from ssa_megatron.quiet import quiet_third_party

quiet_third_party()
PROG = "evaluate.py"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint", help="HF directory (config.json) or Megatron checkpoint dir (with `latest`)"
    )
    p.add_argument(
        "--data",
        help="validation data: a packed MDS split (or a data root with val/), a .npy of token ids, a "
        "JSONL file of documents ({\"text\": ...} per line) or a UTF-8 text file (both need a tokenizer)",
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
    p.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="evaluate although --tokenizer or the shards of --data differ from what the checkpoint recorded",
    )
    p.add_argument(
        "--lm-eval-tasks",
        type=_names,
        help="comma list of lm-evaluation-harness tasks to run on the exported HF directory (lm_eval.json)",
    )
    p.add_argument("--lm-eval-include", help="directory of extra task YAML files for --lm-eval-tasks")
    p.add_argument(
        "--lm-eval-modes",
        type=_names,
        default=["sparse", "full"],
        help="attention modes to score the tasks in (default: sparse,full)",
    )
    p.add_argument("--lm-eval-limit", type=int, help="documents per task (default: all)")
    return p


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _jsonl_stream(path: Path, tokenizer: object | None) -> object:
    """The documents of a JSONL file ({"text": ...} per line), each tokenized and ended with EOS, as the
    training data packs them, concatenated."""
    import json

    import torch

    if tokenizer is None:
        fail(PROG, f"--data {path} is JSONL text; pass --tokenizer (or a checkpoint holding one)", USAGE)
    ids: list[int] = []
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                fail(PROG, f"--data {path}:{n} is not valid JSON; give one JSON object per line", USAGE)
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                fail(PROG, f"--data {path}:{n} has no string field 'text'; each line needs one", USAGE)
            ids += [*tokenizer.encode(doc["text"]), tokenizer.eos_id]
    if not ids:
        fail(PROG, f"--data {path} holds no documents", USAGE)
    return torch.tensor(ids, dtype=torch.int64)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    if not args.data and not args.lm_eval_tasks:
        parser.error("--data is required (or --lm-eval-tasks)")
    minimum = {
        "--batch-size": (args.batch_size, 1),
        "--max-windows": (args.max_windows, 1),
        "--seq-len": (args.seq_len, 2),
        "--passkey-trials": (args.passkey_trials, 1),
        "--block-count": (args.block_count, 1),
        "--lm-eval-limit": (args.lm_eval_limit, 1),
    }
    for flag, (value, low) in minimum.items():
        if value is not None and value < low:
            parser.error(f"{flag} {value} must be >= {low}")
    paths = {"--checkpoint": args.checkpoint, "--data": args.data, "--tokenizer": args.tokenizer}
    for flag, value in paths.items():
        if value and not Path(value).exists():
            fail(PROG, f"{flag} {value} does not exist", USAGE)
    if args.lm_eval_tasks:
        from ssa_megatron.evaluation.harness import HarnessError, check_request

        try:
            check_request(args.checkpoint, args.lm_eval_tasks, args.lm_eval_modes, args.lm_eval_include)
        except HarnessError as err:
            fail(PROG, err, USAGE)
    from ssa_megatron.data.tokenizer import TokenizerMismatch, check_tool_tokenizer

    try:  # checkpoint, --tokenizer and the shards of --data name one tokenizer (tokenizer_fingerprint.json)
        check_tool_tokenizer(args.checkpoint, args.tokenizer, data=args.data,
                             allow_mismatch=args.allow_tokenizer_mismatch)
    except TokenizerMismatch as err:
        fail(PROG, err, USAGE)
    try:
        if args.data:
            _perplexity(args)
        if args.lm_eval_tasks:
            _harness(args)
    except Exception as err:
        from ssa_megatron.training.checkpoint import CheckpointError

        if isinstance(err, CheckpointError):
            fail(PROG, err, DAMAGED)
        if isinstance(err, (ValueError, FileNotFoundError)):
            fail(PROG, err, USAGE)
        raise
    return 0


def _harness(args: argparse.Namespace) -> None:
    import json

    from ssa_megatron.evaluation.harness import run_harness

    results = run_harness(
        args.checkpoint, args.lm_eval_tasks, modes=args.lm_eval_modes, include=args.lm_eval_include,
        limit=args.lm_eval_limit, device=args.device, dtype=args.dtype,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_eval.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for mode, tasks in results.items():
        for task, metrics in tasks.items():
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "stderr" not in k)
            print(f"{mode:>6} {task}: {shown}")
    print(f"lm_eval results: {out / 'lm_eval.json'}")


def _perplexity(args: argparse.Namespace) -> None:
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
    data = Path(args.data)
    if data.suffix in (".jsonl", ".json"):
        stream = _jsonl_stream(data, tokenizer)
    else:
        stream = load_token_stream(args.data, tokenizer)
    split = mds_split_dir(data) if data.is_dir() else None
    # Packed validation rows are scored as training validation scores them (RoPE restarts per document).
    batches = load_mds_batches(split, args.batch_size, args.max_windows) if split else None
    rows = int(batches[0]["tokens"].shape[1]) if batches else None
    if rows is not None and args.seq_len and args.seq_len != rows:
        fail(PROG, f"--seq-len {args.seq_len} differs from the {rows}-token rows of {split}; packed rows "
             "are scored at their own length, so drop --seq-len", USAGE)  # fmt: skip
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


if __name__ == "__main__":
    sys.exit(main())
