#!/usr/bin/env python3
"""Build the demo dataset from documentation installed on this machine (nothing is downloaded).

Collects English prose from the docstrings of installed Python packages, trains a small
sentencepiece tokenizer on it and writes train/val MDS shards into ``--output``:

    python tools/build_demo_corpus.py --output data/demo --seq-len 256 --vocab-size 4096

With ``--corpus-only`` just the jsonl corpus is written (to ``--output``, a file path).
Re-running with the same parameters does nothing.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", help="dataset directory (or the .jsonl path with --corpus-only)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--megabytes", type=float, default=3.0, help="size of the text corpus")
    p.add_argument("--valid-fraction", type=float, default=0.05)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--corpus-only", action="store_true", help="write only the jsonl corpus")
    args = p.parse_args(argv)
    if not args.output:
        p.error("--output is required")
    if args.megabytes <= 0:
        p.error(f"--megabytes {args.megabytes} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ssa_megatron.data.demo_corpus import build_demo_corpus, prepare_demo_dataset

    target = int(args.megabytes * 1_000_000)
    if args.corpus_only:
        stats = build_demo_corpus(args.output, target_bytes=target)
        print(f"wrote {args.output}: {stats.documents} documents, {stats.bytes} bytes from "
              f"{stats.packages} packages in {stats.seconds:.1f} s")
        return 0
    demo = prepare_demo_dataset(
        args.output, args.seq_len, args.vocab_size, target_bytes=target, valid_fraction=args.valid_fraction,
        seed=args.seed, model_type=args.model_type, workers=args.workers, progress=True,
    )
    state = "built" if demo.built else "already up to date"
    print(f"{demo.root} {state}: tokenizer {demo.tokenizer}, shards {demo.train} and {demo.valid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
