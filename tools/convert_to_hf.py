"""Export a Megatron SSA training checkpoint (any TP/PP layout) as a self-contained Hugging Face model.

The output directory holds model.safetensors, config.json (with the SSA fields and auto_map), the
modeling code, a copy of the Triton kernels (used on CUDA) and the tokenizer files; load it with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` without this project installed.

    python tools/convert_to_hf.py --checkpoint runs/ckpt --out exported/ --tokenizer data/tokenizer.model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssa_megatron.convert.cli import DAMAGED, USAGE, ExportError, check_output_dir, fail
from ssa_megatron.quiet import quiet_third_party

quiet_third_party()
PROG = "convert_to_hf.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", help="checkpoint.dir (with `latest`) or one iter_* directory")
    p.add_argument("--out", help="output directory for the HF model (absent or empty, or pass --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out (its old contents go only once the new export is complete)",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json / sentencepiece .model (default: data.tokenizer of the "
        "checkpoint's config, when it exists)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the saved weights (default: %(default)s)",
    )
    p.add_argument("--block-count", type=int, help="default sparse budget stored in config.json")
    p.add_argument(
        "--no-kernels", action="store_true", help="do not ship the Triton kernels (PyTorch path only)"
    )
    p.add_argument(
        "--allow-tokenizer-mismatch",
        action="store_true",
        help="ship a tokenizer other than the one the checkpoint recorded it was trained with",
    )
    p.add_argument(
        "--allow-vocab-mismatch",
        action="store_true",
        help="export with a tokenizer whose vocabulary does not match the checkpoint's embedding (its ids "
        "must still fit)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    if not args.out:
        parser.error("--out is required")
    if args.block_count is not None and args.block_count < 1:
        parser.error(f"--block-count {args.block_count} must be >= 1")
    if not Path(args.checkpoint).is_dir():
        fail(PROG, f"--checkpoint {args.checkpoint} is not a directory; pass checkpoint.dir or an iter_* "
             "directory", USAGE)  # fmt: skip
    if args.tokenizer and not Path(args.tokenizer).exists():
        fail(PROG, f"--tokenizer {args.tokenizer} does not exist; pass a tokenizer.json or .model", USAGE)
    try:
        check_output_dir(args.out, overwrite=args.overwrite)  # before torch loads: an instant answer
    except ExportError as err:
        fail(PROG, err, USAGE)

    from ssa_megatron.data.tokenizer import (
        TokenizerMismatch,
        check_tool_tokenizer,
        checkpoint_tokenizer_path,
        write_fingerprint,
    )

    # The tokenizer shipped must be the one the checkpoint was trained with (tokenizer_fingerprint.json).
    shipped = args.tokenizer or checkpoint_tokenizer_path(args.checkpoint)
    try:
        fingerprint = check_tool_tokenizer(
            args.checkpoint, shipped, allow_mismatch=args.allow_tokenizer_mismatch
        )
    except TokenizerMismatch as err:
        fail(PROG, err, USAGE)

    import torch

    from ssa_megatron.convert.megatron_bridge import TokenizerMismatchError, export_checkpoint_to_hf
    from ssa_megatron.convert.tokenizer_files import TokenizerExportError
    from ssa_megatron.training.checkpoint import CheckpointError

    try:
        overrides = {"block_count": args.block_count} if args.block_count else {}
        out = export_checkpoint_to_hf(
            args.checkpoint,
            args.out,
            tokenizer=args.tokenizer,
            include_kernels=not args.no_kernels,
            dtype=getattr(torch, args.dtype),
            overwrite=args.overwrite,
            allow_vocab_mismatch=args.allow_vocab_mismatch,
            **overrides,
        )
    except (ExportError, TokenizerExportError, TokenizerMismatchError) as err:
        fail(PROG, err, USAGE)
    except CheckpointError as err:
        fail(PROG, err, DAMAGED)
    if fingerprint is not None:
        write_fingerprint(out, fingerprint, role="export")
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
