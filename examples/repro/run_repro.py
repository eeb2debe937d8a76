#!/usr/bin/env python3
"""The paper's three-way comparison (full / sparse / ssa), reproduced end to end by one command.

    python examples/repro/run_repro.py --scale S --seeds 1234,1235

1. data: ``tools/build_corpus.py`` builds the English documentation corpus of this machine, its
   tokenizer and train/val MDS shards (skipped when already built with the same parameters);
2. train: one ``pretrain_ssa.py`` process per (seed, mode), all at once on the one GPU (or
   ``--parallel`` at a time), each on ``examples/repro/<scale>.yaml`` with only
   ``model.attention_mode``, ``train.seed`` and its own paths changed. With ``--deadline`` the
   runs get SIGTERM when that many seconds have passed: they checkpoint, and the same command
   later resumes them (``checkpoint.load: auto``);
3. evaluate: ``tools/evaluate.py`` on every run's latest checkpoint (perplexity in sparse and
   full mode, attention sparsity and entropy per layer, block-count sweep, passkey retrieval);
4. compare: ``tools/compare_runs.py`` over all of them: ``<out>/compare/comparison.md``,
   ``comparison.json`` and overlaid plots, each labelled with run and checkpoint iteration, beside
   a copy of the corpus's ``corpus_manifest.json`` when ``tools/build_corpus.py`` built the data
   (its version, document unit, hash and context shares: which text the table was measured on).

Everything goes under ``--out`` (default ``runs/repro``): ``data/``, ``<scale>/seed<N>/<mode>/``
(checkpoints), ``<scale>/logs/``, ``<scale>/eval/``, ``<scale>/compare/``. Extra
``--section.key value`` arguments go to every training run (e.g. ``--train.train_iters 10``
for a smoke test). Exit status: 0 when every stage ran and every run reached train_iters,
3 when the deadline cut training (checkpoints saved; run the command again), 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("full", "sparse", "ssa")
# Per scale: tokenizer size and the evaluation grid. The sweep goes from half the training budget
# to the whole sequence; passkey prompts up to the training length.
SCALES = {
    "S": {"vocab_size": 8192, "block_counts": "4,8,16,32,64,128", "passkey_lengths": "512,1024,2048"},
    "M": {"vocab_size": 16384, "block_counts": "8,16,32,64,128,256", "passkey_lengths": "1024,2048,4096"},
}
EXIT_CUT = 3


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="S")
    p.add_argument("--config", help="training YAML (default: examples/repro/<scale>.yaml)")
    p.add_argument("--seeds", default="1234", help="comma list of training seeds (default: %(default)s)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of full,sparse,ssa")
    p.add_argument("--out", default="runs/repro", help="root of everything written (default: %(default)s)")
    p.add_argument("--stages", default="data,train,eval,compare", help="comma list of the stages to run")
    p.add_argument("--parallel", type=int, default=0, help="runs at a time (default 0: all at once)")
    p.add_argument(
        "--deadline",
        type=float,
        default=0.0,
        help="seconds after which training runs checkpoint and stop (0: none)",
    )
    p.add_argument(
        "--corpus-args", default="", help="extra arguments for tools/build_corpus.py, e.g. '--sources debian'"
    )
    p.add_argument(
        "--eval-args", default="", help="extra arguments for tools/evaluate.py, e.g. '--max-windows 4'"
    )
    p.add_argument("--device", default=None, help="evaluation device (default: cuda when available)")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("--") and "." not in a.partition("=")[0]]
    if bad:
        p.error(
            f"unrecognized arguments: {' '.join(bad)} (training overrides look like --train.train_iters 10)"
        )
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give integers, e.g. 1234,1235")
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.seeds or not args.modes or any(m not in MODES for m in args.modes):
        p.error(f"--modes {','.join(args.modes) or '(empty)'} / --seeds: choose modes from {','.join(MODES)}")
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in args.stages if s not in ("data", "train", "eval", "compare")]
    if unknown or not args.stages:
        p.error(f"--stages {','.join(unknown) or '(empty)'}: choose from data,train,eval,compare")
    if args.parallel < 0 or args.deadline < 0:
        p.error(f"--parallel {args.parallel} / --deadline {args.deadline} must not be negative")
    args.config = Path(args.config or ROOT / "examples" / "repro" / f"{args.scale}.yaml")
    if not args.config.is_file():
        p.error(f"--config {args.config} does not exist")
    return args, rest


def _load(config: Path, overrides: list[str]) -> Any:
    from ssa_megatron.training.config import ConfigError, load_config, parse_override_args

    try:
        return load_config(config, parse_override_args(overrides))
    except (ConfigError, ValueError) as err:
        print(f"run_repro.py: config error: {err}", file=sys.stderr)
        sys.exit(2)


def _say(msg: str) -> None:
    print(f"[repro {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def latest_iteration(ckpt_dir: Path) -> int | None:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    complete = ckpt_dir / latest.read_text().strip() / "complete.json"
    if not complete.is_file():
        return None
    return int(json.loads(complete.read_text())["iteration"])


def _command(script: str, options: dict[str, object], *extra: str) -> list[str]:
    """``python ROOT/script --option value ... extra``: the command line of one stage's tool."""
    return [sys.executable, str(ROOT / script), *(x for o, v in options.items() for x in (o, str(v))), *extra]


def build_data(args: argparse.Namespace, data_dir: Path, seq_len: int) -> None:
    cmd = _command(
        "tools/build_corpus.py",
        {"--output": data_dir, "--seq-len": seq_len, "--vocab-size": SCALES[args.scale]["vocab_size"]},
        *args.corpus_args.split(),
    )
    _say("data: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=ROOT)


def _run_copy(data_dir: Path, run_dir: Path) -> Path:
    """A private copy of the MDS splits for one run (a few MB), so that the runs share no files:
    one run's evaluation or a re-built corpus never changes what another run reads."""
    copy = run_dir / "data"
    manifest = data_dir / "corpus_manifest.json"
    stamp = copy / "corpus_manifest.json"
    if stamp.is_file() and manifest.is_file() and stamp.read_bytes() == manifest.read_bytes():
        return copy
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(data_dir / split, copy / split)
    if manifest.is_file():
        shutil.copy2(manifest, stamp)
    return copy


def train(args: argparse.Namespace, runs: list[dict], overrides: list[str], start: float) -> bool:
    """Start every unfinished run (``--parallel`` at a time); True when all reached train_iters."""
    pending = [r for r in runs if (latest_iteration(r["ckpt"]) or 0) < r["train_iters"]]
    for r in runs:
        if r not in pending:
            _say(f"train {r['name']}: already at iteration {r['train_iters']}")
    active: list[tuple[dict, subprocess.Popen, object]] = []
    limit = args.parallel or len(pending) or 1
    stopping = False
    while pending or active:
        while pending and len(active) < limit and not stopping:
            r = pending.pop(0)
            cmd = _command(
                "pretrain_ssa.py",
                {
                    "--config": args.config,
                    "--model.attention_mode": r["mode"],
                    "--train.seed": r["seed"],
                    "--checkpoint.dir": r["ckpt"],
                    "--data.path": r["data"],
                    "--data.tokenizer": r["tokenizer"],
                    "--logging.tensorboard_dir": r["ckpt"] / "tb",
                },
                *overrides,
            )
            r["log"].parent.mkdir(parents=True, exist_ok=True)
            log = r["log"].open("a")
            _say(f"train {r['name']}: start (log {r['log']})")
            active.append((r, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        if args.deadline and not stopping and time.monotonic() - start > args.deadline:
            _say(f"deadline {args.deadline:.0f} s reached: asking {len(active)} runs to checkpoint and stop")
            stopping = True
            pending.clear()
            for _, proc, _ in active:
                proc.send_signal(signal.SIGTERM)
        for item in list(active):
            r, proc, log = item
            if proc.poll() is not None:
                log.close()
                active.remove(item)
                reached = latest_iteration(r["ckpt"])
                _say(f"train {r['name']}: exit {proc.returncode}, checkpoint at iteration {reached}")
                if proc.returncode != 0:
                    tail = r["log"].read_text(errors="replace").splitlines()[-15:]
                    print("\n".join(tail), flush=True)
        time.sleep(2)
    return all(latest_iteration(r["ckpt"]) == r["train_iters"] for r in runs)


def evaluate(args: argparse.Namespace, runs: list[dict], eval_root: Path) -> list[Path]:
    """tools/evaluate.py on each run's latest checkpoint, ``--parallel`` at a time; returns the outputs."""
    scale = SCALES[args.scale]
    jobs = []
    for r in runs:
        if latest_iteration(r["ckpt"]) is None:
            _say(f"eval {r['name']}: no checkpoint, skipped")
            continue
        out = eval_root / r["name"].replace("/", "_")
        cmd = _command(
            "tools/evaluate.py",
            {
                "--checkpoint": r["ckpt"],
                "--data": r["data"],
                "--tokenizer": r["tokenizer"],
                "--out": out,
                "--run-name": r["name"],
                "--block-counts": scale["block_counts"],
                "--passkey-lengths": scale["passkey_lengths"],
                "--extrapolation-factors": "1,2",
            },
            "--no-progress",
            *args.eval_args.split(),
        )
        if args.device:
            cmd += ["--device", args.device]
        jobs.append((r, out, cmd))
    limit = args.parallel or len(jobs) or 1
    done: list[Path] = []
    for i in range(0, len(jobs), limit):
        batch = []
        for r, out, cmd in jobs[i : i + limit]:
            log = eval_root / f"{out.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            _say(f"eval {r['name']}: start (log {log})")
            batch.append(
                (r, out, log, subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT))
            )
        for r, out, log, proc in batch:
            proc.wait()
            if proc.returncode == 0:
                done.append(out)
                _say(f"eval {r['name']}: done")
            else:
                _say(f"eval {r['name']}: FAILED (exit {proc.returncode})")
                print("\n".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    start = time.monotonic()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cfg = _load(args.config, overrides)
    out = Path(args.out)
    data_dir = Path(cfg.data.path) if "--data.path" in overrides else out / "data"
    scale_dir = out / args.scale
    if "data" in args.stages:
        try:
            build_data(args, data_dir, cfg.data.seq_length)
        except subprocess.CalledProcessError as err:
            print(
                f"run_repro.py: tools/build_corpus.py failed (exit {err.returncode}); see above",
                file=sys.stderr,
            )
            return 2 if err.returncode == 2 else 1
    tokenizer = data_dir / "tokenizer.model"
    if not (data_dir / "train").is_dir() or not tokenizer.is_file():
        print(
            f"run_repro.py: {data_dir} holds no train/ split or tokenizer.model; run the data stage "
            "(--stages data,...)",
            file=sys.stderr,
        )
        return 2
    runs = []
    for seed in args.seeds:
        for mode in args.modes:
            run_dir = scale_dir / f"seed{seed}" / mode
            run_dir.mkdir(parents=True, exist_ok=True)
            runs.append(
                {
                    "name": f"{mode}/seed{seed}",
                    "mode": mode,
                    "seed": seed,
                    "ckpt": run_dir,
                    "data": _run_copy(data_dir, run_dir),
                    "tokenizer": tokenizer.resolve(),
                    "log": scale_dir / "logs" / f"seed{seed}_{mode}.log",
                    "train_iters": cfg.train.train_iters,
                }
            )
    complete = True
    if "train" in args.stages:
        complete = train(args, runs, overrides, start)
        _say(
            f"train: {'all runs complete' if complete else 'cut by the deadline or failed'} "
            f"after {time.monotonic() - start:.0f} s"
        )
    evaluated: list[Path] = []
    if "eval" in args.stages:
        evaluated = evaluate(args, runs, scale_dir / "eval")
    if "compare" in args.stages:
        sources = evaluated or sorted(p.parent for p in (scale_dir / "eval").glob("*/results.json"))
        if not sources:
            print("run_repro.py: nothing evaluated to compare", file=sys.stderr)
            return 1
        cmd = [
            sys.executable,
            str(ROOT / "tools" / "compare_runs.py"),
            *map(str, sources),
            "--out",
            str(scale_dir / "compare"),
            "--title",
            f"scale {args.scale}",
        ]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            print("run_repro.py: tools/compare_runs.py failed; see above", file=sys.stderr)
            return 1
        manifest = data_dir / "corpus_manifest.json"
        if manifest.is_file():  # absent for shards of the user's own (--data.path)
            shutil.copyfile(manifest, scale_dir / "compare" / manifest.name)
    _say(f"finished in {time.monotonic() - start:.0f} s")
    if not complete:
        return EXIT_CUT
    return 0 if len(evaluated) == len(runs) or "eval" not in args.stages else 1


if __name__ == "__main__":
    sys.exit(main())
