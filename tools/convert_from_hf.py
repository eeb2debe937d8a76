"""Convert a Llama-architecture Hugging Face checkpoint into an SSA Megatron checkpoint at a chosen TP/PP.

The checkpoint's iter_*/config.yaml trains as-is once data.path is given (it loads these weights with
checkpoint.load_weights_only and names a copy of the tokenizer):

    python pretrain_ssa.py --config ckpt/iter_0000000/config.yaml --data.path my_mds/

The SSA gate is added with zero weights (sigmoid(0) = 0.5 on every head) and o_proj is doubled, so in
full-attention mode the converted model computes exactly what the original does; sparse mode is the
original with SSA block-sparse attention. Continue pretraining from it with
`checkpoint.load=<out> checkpoint.load_weights_only=true`.

    python tools/convert_from_hf.py --hf Llama-3.2-1B/ --out ckpt/ --tp 2 --pp 1 --seq-length 8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssa_megatron.convert.cli import DAMAGED, USAGE, ExportError, check_output_dir, fail
from ssa_megatron.quiet import quiet_third_party

quiet_third_party()
PROG = "convert_from_hf.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hf", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--out", help="output checkpoint directory (gets `latest` and iter_0000000/)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the written checkpoint")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--block-count", type=int, default=16)
    p.add_argument(
        "--seq-length", type=int, help="training sequence length (default: max_position_embeddings)"
    )
    p.add_argument(
        "--drop-rope-scaling",
        action="store_true",
        help="convert a model with rope_scaling anyway (the SSA model uses plain RoPE)",
    )
    p.add_argument("--hf-out", help="also write the converted model as an SSA HF directory here")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out / --hf-out (old contents go only once the new one is complete)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.hf:
        parser.error("--hf is required")
    if not args.out:
        parser.error("--out is required")
    for flag, value in (("--tp", args.tp), ("--pp", args.pp), ("--block-size", args.block_size),
                        ("--block-count", args.block_count), ("--seq-length", args.seq_length)):  # fmt: skip
        if value is not None and value < 1:
            parser.error(f"{flag} {value} must be >= 1")
    if not Path(args.hf).is_dir():
        fail(PROG, f"--hf {args.hf} is not a directory; pass a Hugging Face model directory", USAGE)
    try:
        # Both outputs are checked before torch loads and the (long) conversion starts.
        check_output_dir(args.out, overwrite=args.overwrite)
        if args.hf_out:
            check_output_dir(args.hf_out, overwrite=args.overwrite)
    except ExportError as err:
        fail(PROG, err, USAGE)

    from ssa_megatron.convert.export import save_hf_directory
    from ssa_megatron.convert.llama_import import LlamaImportError, LlamaReadError, ssa_from_llama
    from ssa_megatron.convert.megatron_bridge import write_megatron_checkpoint
    from ssa_megatron.convert.tokenizer_files import TokenizerExportError

    try:
        model = ssa_from_llama(
            args.hf,
            block_size=args.block_size,
            block_count=args.block_count,
            seq_length=args.seq_length,
            drop_rope_scaling=args.drop_rope_scaling,
        )
        candidates = [Path(args.hf) / name for name in ("tokenizer.json", "tokenizer.model")]
        tok = next((path for path in candidates if path.is_file()), None)
        ckpt = write_megatron_checkpoint(
            model, args.out, tp=args.tp, pp=args.pp, tokenizer=tok, overwrite=args.overwrite
        )
        print(f"converted {args.hf} -> {ckpt} (TP={args.tp}, PP={args.pp})")
        if args.hf_out:
            save_hf_directory(model, args.hf_out, tokenizer_path=tok, overwrite=args.overwrite)
            print(f"SSA HF directory: {args.hf_out}")
    except LlamaReadError as err:
        fail(PROG, err, DAMAGED)
    except (LlamaImportError, ExportError, TokenizerExportError) as err:
        fail(PROG, err, USAGE)
    except ValueError as err:  # a layout that does not divide the model (--tp / --pp)
        fail(PROG, err, USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
