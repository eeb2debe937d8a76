#!/usr/bin/env python3
"""Tokenize text/jsonl/parquet into packed MDS shards (rows of seq_len + 1 tokens) for training.

Example:
    python tools/prepare_data.py --input 'data/*.jsonl.gz' --tokenizer tok.model --seq-len 4096 \\
        --output shards/ --valid-fraction 0.005 --workers 16

Writes ``<output>/train`` and ``<output>/val`` (compressed shards with sha1 and xxh64 hashes,
which training checks after each download; see ``ssa_megatron.data.packing`` for the columns),
locally or straight to object storage (``--output s3://bucket/dataset``). Documents end with EOS;
per-row document starts are stored so the trainer restarts positions and masks each document's
first token. A .txt file is one document unless --sample-by says otherwise. Empty, non-UTF-8
and malformed records are counted and skipped with a warning.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[], help="files, directories, globs, or - for stdin")
    p.add_argument("--valid-input", nargs="+", default=[], help="separate validation inputs")
    p.add_argument("--valid-fraction", type=float, default=0.0,
                   help="send this fraction of documents (seeded) to the validation split")
    p.add_argument("--output", help="output directory or object-store URI, e.g. s3://bucket/dataset (train/ "
                   "and val/ are created in it; credentials from the environment, S3_ENDPOINT_URL for "
                   "non-AWS stores)")
    p.add_argument("--sample-by", choices=("document", "paragraph", "line"), default="document",
                   help="how .txt files split into documents: the whole file (default), blank-line separated "
                   "paragraphs, or lines")
    p.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer.json")
    p.add_argument("--seq-len", type=int, help="training sequence length (rows hold seq_len + 1 tokens)")
    p.add_argument("--text-key", default="text")
    p.add_argument("--add-bos", action="store_true", help="start every document with BOS")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--compression", default="zstd", help="shard compression (zstd, gz, none, ...)")
    p.add_argument("--shard-size", type=int, default=1 << 26, help="max bytes per shard before compression")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split")
    p.add_argument("--overwrite", action="store_true", help="replace existing train/ and val/")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", help="also write the summary to this file")
    args = p.parse_args(argv)
    for name in ("input", "output", "tokenizer", "seq_len"):
        if not getattr(args, name):
            p.error(f"--{name.replace('_', '-')} is required")
    if args.seq_len < 1:
        p.error(f"--seq-len {args.seq_len} must be positive")
    if not 0.0 <= args.valid_fraction < 1.0:
        p.error(f"--valid-fraction {args.valid_fraction} must be in [0, 1)")
    if args.valid_fraction and args.valid_input:
        p.error("use either --valid-fraction or --valid-input, not both")
    if args.workers < 1:
        p.error(f"--workers {args.workers} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from ssa_megatron.data.prepare import prepare_dataset

    try:
        summary = prepare_dataset(
            args.input, args.output, args.tokenizer, args.seq_len, valid_inputs=args.valid_input,
            valid_fraction=args.valid_fraction, text_key=args.text_key, seed=args.seed, add_bos=args.add_bos,
            workers=args.workers, compression=None if args.compression == "none" else args.compression,
            shard_size_limit=args.shard_size, overwrite=args.overwrite, progress=not args.no_progress,
            sample_by=args.sample_by,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
