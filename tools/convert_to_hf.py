"""Export a Megatron SSA training checkpoint (any TP/PP layout) as a self-contained Hugging Face model.

The output directory holds model.safetensors, config.json (with the SSA fields and auto_map), the
modeling code, a copy of the Triton kernels (used on CUDA) and the tokenizer files; load it with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` without this project installed.

    python tools/convert_to_hf.py --checkpoint runs/ckpt --out exported/ --tokenizer data/tokenizer.model
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint.dir (with `latest`) or one iter_* directory")
    p.add_argument("--out", help="output directory for the HF model")
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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint:
        parser.error("--checkpoint is required")
    if not args.out:
        parser.error("--out is required")

    import torch

    from ssa_megatron.convert.megatron_bridge import export_checkpoint_to_hf

    overrides = {"block_count": args.block_count} if args.block_count else {}
    out = export_checkpoint_to_hf(
        args.checkpoint,
        args.out,
        tokenizer=args.tokenizer,
        include_kernels=not args.no_kernels,
        dtype=getattr(torch, args.dtype),
        **overrides,
    )
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
