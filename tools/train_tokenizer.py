#!/usr/bin/env python3
"""Train a sentencepiece tokenizer (BPE or unigram, byte fallback) from text, jsonl or parquet.

Example:
    python tools/train_tokenizer.py --input corpus/ --text-key text --vocab-size 32000 \\
        --model-type bpe --output tokenizers/mytok --special-tokens "<|im_start|>" "<|im_end|>"

Writes ``<output>.model`` and ``<output>.vocab``. Ids: unk=0, bos=1 (<s>), eos=2 (</s>),
pad=3 (<pad>), then the ``--special-tokens`` in order. Same input + options + seed gives a
byte-identical model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", default=[], help="files, directories, globs, or - for stdin")
    p.add_argument("--output", help="output prefix: writes <output>.model and <output>.vocab")
    p.add_argument("--text-key", default="text", help="jsonl field / parquet column holding the text")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to <unk>")
    p.add_argument("--special-tokens", nargs="*", default=[], help="extra user-defined special tokens")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-sentences", type=int, default=0,
                   help="train on a seeded sample of this many lines (0: all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="trainer threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.input:
        p.error("--input is required (files, directories, globs or -)")
    if not args.output:
        p.error("--output is required (prefix of the .model/.vocab files)")
    if args.vocab_size < 8:
        p.error(f"--vocab-size {args.vocab_size} is too small")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from ssa_megatron.data.readers import ReadStats, expand_inputs, iter_documents
    from ssa_megatron.data.tokenizer import load_tokenizer, train_sentencepiece

    try:
        files = expand_inputs(args.input)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stats = ReadStats()

    def documents() -> Iterator[str]:
        yield from tqdm(iter_documents(files, text_key=args.text_key, stats=stats), desc="reading",
                        unit="doc", disable=args.no_progress, mininterval=1.0)

    model = train_sentencepiece(
        documents(), args.output, vocab_size=args.vocab_size, model_type=args.model_type,
        byte_fallback=not args.no_byte_fallback, user_defined_symbols=args.special_tokens,
        character_coverage=args.character_coverage, input_sentence_size=args.max_sentences,
        seed=args.seed, num_threads=args.threads,
    )
    warning = stats.warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    tok = load_tokenizer(model)
    print(f"wrote {model} (vocab {tok.vocab_size}, bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id}) "
          f"from {stats.documents} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
