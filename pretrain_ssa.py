"""Training entry point (torchrun / DeepSpeed launcher)."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SSA pretraining on Megatron-core")
    parser.add_argument("--config", required=True, help="YAML config, e.g. examples/tiny_cpu.yaml")
    parser.parse_args(argv)
    print("pretrain_ssa.py: training is not yet available in this build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
