"""Training entry point (torchrun / DeepSpeed launcher / plain python).

python pretrain_ssa.py --config examples/tiny_cpu.yaml [--section.key value ...]
python pretrain_ssa.py --config examples/tiny_cpu.yaml --print-config    # the resolved config, no run
torchrun --nnodes 8 --nproc-per-node 8 ... pretrain_ssa.py --config examples/ssa_1b_8k.yaml
deepspeed --hostfile hostfile pretrain_ssa.py --config ... --deepspeed --deepspeed_config ds.json

The config is read and validated before torch or megatron is imported: a bad value exits with code 2
and one line naming the key, the value and the fix, before anything is built or written.
"""

from __future__ import annotations

import argparse
import sys

from ssa_megatron.quiet import quiet_third_party

# Module level: the processes a launcher or a loader spawns re-import this module, so they are quiet too.
quiet_third_party()


def build_parser() -> argparse.ArgumentParser:
    from ssa_megatron.training.config import config_help

    parser = argparse.ArgumentParser(
        description="SSA pretraining on Megatron-core. Any config key can be overridden with --section.key\n"
        "value (e.g. --model.num_layers 4 --train.train_iters 100). A run resumes from\n"
        "checkpoint.dir/latest when it exists (checkpoint.load: auto); train.stop_after ends a job early\n"
        "for the next one to resume.",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config, e.g. examples/tiny_cpu.yaml")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file + overrides + ${section.key} references) as YAML and exit; "
        "the output is itself a valid --config",
    )
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the DeepSpeed launcher; not needed otherwise",
    )
    parser.add_argument("--deepspeed", action="store_true", help="train with the DeepSpeed engine (ZeRO 1/2)")
    parser.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default=None,
        help="DeepSpeed JSON config, e.g. examples/deepspeed/zero1_bf16.json",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    from ssa_megatron.training.config import ConfigError, load_config, parse_args_and_overrides

    args, overrides = parse_args_and_overrides(parser, argv)
    if args.config is None:
        parser.error("--config is required, e.g. --config examples/tiny_cpu.yaml")
    if args.deepspeed:
        overrides.append(("train", "engine", "deepspeed"))
    if args.deepspeed_config is not None:
        if not args.deepspeed:
            parser.error("--deepspeed_config needs --deepspeed")
        overrides.append(("train", "deepspeed_config", args.deepspeed_config))
    warnings_seen: list[str] = []
    try:
        cfg = load_config(args.config, overrides, warn=warnings_seen.append)
    except ConfigError as err:
        print(f"pretrain_ssa.py: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        for line in warnings_seen:
            print(f"pretrain_ssa.py: config warning: {line}", file=sys.stderr)
        sys.stdout.write(cfg.to_yaml())
        return 0

    from ssa_megatron.training.launch import detect_launch

    # One copy of each warning per job, not one per rank.
    if detect_launch(args.local_rank).is_main:
        for line in warnings_seen:
            print(f"pretrain_ssa.py: config warning: {line}", file=sys.stderr)

    from ssa_megatron.training import main_run

    return main_run(cfg, local_rank=args.local_rank)


if __name__ == "__main__":
    sys.exit(main())
