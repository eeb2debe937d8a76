#!/usr/bin/env python3
"""Compare evaluated runs: one Markdown + JSON table and overlaid plots across checkpoints.

Takes the output directories of tools/evaluate.py (each holds a results.json naming its run and
checkpoint iteration) and writes into --out: comparison.md, comparison.json (perplexity in sparse
and full inference, attention sparsity and entropy, block-count sweep, passkey accuracy; per run
and per attention mode over seeds) and PNGs overlaying every run (budget sweep, per-layer
sparsity and entropy, passkey), each curve labelled `run @ iteration`:

    python tools/compare_runs.py runs/eval_full runs/eval_sparse runs/eval_ssa --out runs/compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="*", help="output folders of tools/evaluate.py")
    p.add_argument("--out", default="compare", help="output directory (default: %(default)s)")
    p.add_argument("--title", default="", help="title of the table and plots, e.g. 'scale S'")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.results) < 2:
        parser.error(f"give at least two evaluated runs to compare (got {len(args.results)})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; give a directory")
    from ssa_megatron.evaluation.compare import write_comparison

    try:
        files = write_comparison(args.results, out, args.title)
    except (FileNotFoundError, ValueError) as err:
        print(f"compare_runs.py: {err}", file=sys.stderr)
        return 2
    print(Path(files["markdown"]).read_text(encoding="utf-8"))
    print("wrote " + ", ".join(files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
