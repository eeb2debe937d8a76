"""Training entry point (torchrun / DeepSpeed launcher)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SSA pretraining on Megatron-core")
    parser.add_argument("--config", help="YAML config, e.g. examples/tiny_cpu.yaml")
    args = parser.parse_args(argv)
    if args.config is None:
        parser.error("--config is required, e.g. --config examples/tiny_cpu.yaml")
    print("pretrain_ssa.py: training is not yet available in this build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
