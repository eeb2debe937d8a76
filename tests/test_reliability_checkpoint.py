"""Reliability of runs and checkpoints, through the real entry point (pretrain_ssa.py).

- the save protocol killed (SIGKILL) at every step, fresh and re-saving an iteration: what `latest`
  names after start-up recovery is complete, and a resumed run continues bitwise like an
  uninterrupted one;
- no checkpoint-writer process outlives a kill -9 of the trainer in the middle of a save;
- SIGINT/SIGTERM finish the step, save once and exit 0; a second Ctrl-C aborts at once;
- bad inputs and damaged or crafted checkpoints: exit code, one line naming the value, no
  traceback, nothing on disk changed (and nothing in a crafted pickle executed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.run_helpers import TINY_MODEL, default_and_slow, flags
from tests.test_training_golden_curve import build_dataset

ROOT = Path(__file__).resolve().parents[1]
ITERS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_dataset(tmp_path_factory.mktemp("reliability_data")))


def cli_args(data: str, ckpt: str | None, *extra: str) -> list[str]:
    pairs = {
        "data.path": data,
        "data.tokenizer": data + "/tokenizer.model",
        "data.build_demo": "false",
        "data.seq_length": "128",
        **TINY_MODEL,
        "train.micro_batch_size": "2",
        "train.global_batch_size": "4",
        "train.train_iters": str(ITERS),
        "optim.warmup_iters": "1",
        "eval.at_end": "false",
        "eval.interval": "0",
        "logging.interval": "1",
        "logging.progress": "lines",
        "logging.tensorboard_dir": "null",
        "checkpoint.dir": ckpt if ckpt is not None else "null",
    }
    return ["--config", "examples/tiny_cpu.yaml", *flags(pairs), *extra]


def _env(**extra: str) -> dict[str, str]:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(extra)
    return env


def cli(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "pretrain_ssa.py", *args],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tree_hash(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# ------------------------------------------------------------------------------------------------
# The publish protocol killed at every step (no training: fast, every step, fresh and re-save).

FAULT_POINTS = ("synced", "old_aside", "new_in", "latest_tmp", "latest", "old_removed")


def _fake_checkpoint(path: Path, tag: str) -> None:
    path.mkdir(parents=True)
    (path / "payload").write_text(tag)
    (path / "complete.json").write_text(json.dumps({"iteration": 2, "tag": tag}))


@pytest.mark.parametrize("resave", [False, True], ids=["fresh", "resave"])
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_publish_killed_at_every_step_keeps_a_complete_latest(
    tmp_path: Path, point: str, resave: bool
) -> None:
    from ssa_megatron.training import checkpoint as ckpt

    root = tmp_path / "ckpt"
    _fake_checkpoint(root / "iter_0000001", "first")
    (root / "latest").write_text("iter_0000001\n")
    if resave:
        _fake_checkpoint(root / "iter_0000002", "old")
        (root / "latest").write_text("iter_0000002\n")
    _fake_checkpoint(root / "iter_0000002.partial", "new")
    pid = os.fork()
    if pid == 0:  # the child runs the protocol and SIGKILLs itself at `point`
        os.environ[ckpt.FAULT_ENV] = point
        try:
            ckpt.publish(root, root / "iter_0000002.partial", root / "iter_0000002")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    # Not every point exists on a fresh save (no old copy to move aside or remove).
    assert killed or (not resave and point in ("old_aside",)), status
    ckpt.recover(root)
    name = (root / "latest").read_text().strip()
    target = root / name
    assert (target / "complete.json").exists(), sorted(p.name for p in root.iterdir())
    tag = (target / "payload").read_text()
    before_latest = point in ("synced", "old_aside", "new_in", "latest_tmp")
    if killed and before_latest:
        assert name == ("iter_0000002" if resave else "iter_0000001")
        assert tag == ("old" if resave else "first") or (point in ("new_in", "latest_tmp") and tag == "new")
    else:
        assert (name, tag) == ("iter_0000002", "new")
    leftovers = [p.name for p in root.iterdir() if p.name.endswith((".partial", ".old", ".tmp"))]
    assert leftovers == []


# ------------------------------------------------------------------------------------------------
# Killed real saves, resumed bitwise.


def _history(rank: int, world: int, args: list[str]) -> list[tuple[float, float, float]]:
    import io

    import torch

    from ssa_megatron.training import load_config, parse_override_args, run

    torch.set_num_threads(1)
    cfg = load_config(args[1], parse_override_args(args[2:]))
    result = run(cfg, stream=io.StringIO())
    return [(h["ce_loss"], h["align_loss"], h["lr"]) for h in result.history]


# Killed after `latest` moved in the default run; before it (the save's files written, `latest` not yet
# moved) with -m slow: the protocol test above covers every step of that kind without training.
@pytest.mark.parametrize("point", default_and_slow(["written", "latest"], default=["latest"]))
def test_killed_save_resumes_bitwise(data_dir: str, tmp_path: Path, point: str) -> None:
    ckpt = tmp_path / "ckpt"
    # Every run has the same schedule (6 iterations); stop_after cuts the first two short.
    common = ("--checkpoint.save_interval", "2", "--train.train_iters", "6")
    fresh = ("--checkpoint.load", "none", "--train.stop_after", "2")
    first = cli(cli_args(data_dir, str(ckpt), *common, *fresh))
    assert first.returncode == 0, first.stderr[-3000:]
    # Resumed at 2; the save of iteration 4 is killed at `point`.
    stop = ("--train.stop_after", "4")
    killed = cli(cli_args(data_dir, str(ckpt), *common, *stop), SSA_MEGATRON_FAULT_AT=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    latest = (ckpt / "latest").read_text().strip()
    # Killed before `latest` moved the run resumes at 2, after it at 4; both must match the reference.
    assert latest == ("iter_0000002" if point == "written" else "iter_0000004"), latest
    (resumed,) = run_distributed(_history, 1, (cli_args(data_dir, str(ckpt), *common),))
    uninterrupted = cli_args(data_dir, None, "--checkpoint.load", "none", *common[2:])
    (reference,) = run_distributed(_history, 1, (uninterrupted,))
    done = int(latest.split("_")[1])
    assert resumed == reference[done:], (resumed, reference)
    assert not any(p.name.endswith((".partial", ".old")) for p in ckpt.iterdir())


@pytest.mark.slow  # its recovery step is in the protocol test (resave-old_aside); this adds a real run
def test_resave_killed_with_old_aside_recovers_and_resumes_bitwise(data_dir: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    common = ("--checkpoint.save_interval", "2", "--train.train_iters", "6", "--train.stop_after", "4")
    first = cli(cli_args(data_dir, str(ckpt), *common, "--checkpoint.load", "none"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    # Retrain 3..4 from iteration 2: the save of iteration 4 replaces the existing iter_0000004.
    again = cli(
        cli_args(data_dir, str(ckpt), *common, "--checkpoint.load", str(ckpt / "iter_0000002")),
        SSA_MEGATRON_FAULT_AT="old_aside",
    )
    assert again.returncode == -signal.SIGKILL, again.stderr[-3000:]
    assert not (ckpt / "iter_0000004").exists() and (ckpt / "iter_0000004.old").exists()
    (resumed,) = run_distributed(_history, 1, (cli_args(data_dir, str(ckpt), *common[:4]),))
    uninterrupted = cli_args(data_dir, None, "--checkpoint.load", "none", *common[2:4])
    (reference,) = run_distributed(_history, 1, (uninterrupted,))
    assert resumed == reference[4:]
    assert (ckpt / "iter_0000004" / "complete.json").exists() and not (ckpt / "iter_0000004.old").exists()


def test_no_writer_outlives_a_killed_trainer(data_dir: str, tmp_path: Path) -> None:
    pids = tmp_path / "writer_pids"
    proc = cli(
        cli_args(data_dir, str(tmp_path / "ckpt"), "--checkpoint.load", "none", "--train.train_iters", "2"),
        SSA_MEGATRON_FAULT_AT="writer",
        SSA_MEGATRON_FAULT_AT_PIDS=str(pids),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    writers = [int(x) for x in pids.read_text().split()]
    assert writers, "no checkpoint writer was forked"
    deadline = time.monotonic() + 10
    alive = writers
    while alive and time.monotonic() < deadline:
        alive = [p for p in writers if _running(p)]
        time.sleep(0.2)
    for pid in alive:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"writer processes {alive} outlived the trainer"


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


# ------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM.


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-u", "pretrain_ssa.py", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _signal_at_iteration(proc: subprocess.Popen, signals: list[int], iteration: int = 2) -> str:
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if f" {iteration}/500 " in line:  # the table row of `iteration`
                for sig in signals:
                    proc.send_signal(sig)
                    time.sleep(0.05)
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return "".join(lines) + rest


# SIGTERM (what a scheduler sends) in the default run; the first Ctrl-C takes the same handler (slow).
@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGINT, id="sigint", marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, id="sigterm"),
    ],
)
def test_signal_finishes_the_step_saves_once_and_exits_0(data_dir: str, tmp_path: Path, sig: int) -> None:
    ckpt = tmp_path / "ckpt"
    proc = _start(cli_args(data_dir, str(ckpt), "--checkpoint.load", "none", "--train.train_iters", "500"))
    log = _signal_at_iteration(proc, [sig])
    assert proc.returncode == 0, log[-3000:]
    assert f"{signal.Signals(sig).name}: stopped after iteration" in log
    assert log.count("saved checkpoint") == 1 and "Traceback" not in log
    name = (ckpt / "latest").read_text().strip()
    assert 2 <= int(name.split("_")[1]) < 500 and (ckpt / name / "complete.json").exists()


def test_second_ctrl_c_aborts_at_once(data_dir: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    proc = _start(cli_args(data_dir, str(ckpt), "--checkpoint.load", "none", "--train.train_iters", "500"))
    log = _signal_at_iteration(proc, [signal.SIGINT, signal.SIGINT])
    assert proc.returncode == -signal.SIGINT, log[-3000:]
    assert "saved checkpoint" not in log and not (ckpt / "latest").exists()


# ------------------------------------------------------------------------------------------------
# Bad inputs and damaged/crafted checkpoints: exit code, one line naming the value, disk unchanged.


@pytest.fixture(scope="module")
def good_checkpoint(data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("good") / "ckpt"
    proc = cli(cli_args(data_dir, str(ckpt), "--checkpoint.load", "none", "--train.train_iters", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt


class _Payload:
    """Pickles to a call of os.system: what a crafted checkpoint file would run on a plain load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _case(name: str, root: Path, ckpt: Path, good: Path) -> tuple[list[str], int, str]:
    """Set up case `name` under `root`; return (extra CLI args, exit code, expected message)."""
    import torch

    it = ckpt / "iter_0000002"
    if name == "dir_is_a_file":
        ckpt.write_text("not a directory")
        return [], 2, f"checkpoint.dir={str(ckpt)!r} is a file"
    if name == "dir_below_a_file":
        (root / "afile").write_text("x")
        return ["--checkpoint.dir", str(root / "afile" / "ckpt")], 2, "which is a file"
    if name == "overwrite_not_a_bool":
        return ["--checkpoint.overwrite", "maybe"], 2, "checkpoint.overwrite"
    shutil.copytree(good, ckpt)
    if name == "fresh_over_earlier_run":
        return ["--checkpoint.load", "none"], 2, "holds checkpoints of an earlier run (latest = iter_0000002)"
    if name == "load_missing_path":
        return ["--checkpoint.load", str(root / "nowhere")], 1, "neither a checkpoint"
    if name == "dangling_latest":
        (ckpt / "latest").write_text("iter_0000009\n")
        return [], 1, "points at 'iter_0000009', which does not exist"
    if name == "no_complete_marker":
        (it / "complete.json").unlink()
        return [], 1, "is incomplete (no complete.json)"
    if name == "corrupt_complete_marker":
        (it / "complete.json").write_text("{not json")
        return [], 1, "complete.json is corrupt"
    if name == "truncated_shard":
        shard = max((it / "model").rglob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[:100])
        return [], 1, "could not read the model weights"
    if name == "missing_rank_state":
        (it / "rank_00000.pt").unlink()
        return [], 1, "rank_00000.pt is missing"
    if name in ("crafted_train_state", "crafted_rank_state"):
        target = it / ("train_state.pt" if name == "crafted_train_state" else "rank_00000.pt")
        torch.save({"iteration": _Payload(root / "pwned")}, target)
        return [], 1, f"{target.name} holds objects other than tensors and plain values"
    if name == "truncated_train_state":
        target = it / "train_state.pt"
        target.write_bytes(target.read_bytes()[:50])
        return [], 1, "train_state.pt is unreadable"
    if name == "vocab_mismatch":
        return ["--model.vocab_size", "640"], 1, "[vocab, hidden] [512, 64], this run's model has [640, 64]"
    if name == "hidden_mismatch":
        return ["--model.hidden_size", "128", "--model.ffn_hidden_size", "384"], 1, "[512, 64], this run's"
    raise AssertionError(name)


BAD_INPUTS = [
    "dir_is_a_file",
    "dir_below_a_file",
    "overwrite_not_a_bool",
    "fresh_over_earlier_run",
    "load_missing_path",
    "dangling_latest",
    "no_complete_marker",
    "corrupt_complete_marker",
    "truncated_shard",
    "missing_rank_state",
    "crafted_train_state",
    "crafted_rank_state",
    "truncated_train_state",
    "vocab_mismatch",
    "hidden_mismatch",
]


# One case of each kind in the default run (a bad checkpoint.dir, a bad `latest`, a damaged file, a crafted
# pickle, a model that does not fit); every case with -m slow.
@pytest.mark.parametrize(
    "name",
    default_and_slow(
        BAD_INPUTS,
        default=("dir_is_a_file", "dangling_latest", "truncated_shard", "crafted_train_state",
                 "vocab_mismatch"),
    ),
)
def test_bad_input_exits_with_one_line_and_changes_nothing(
    data_dir: str, good_checkpoint: Path, tmp_path: Path, name: str
) -> None:
    ckpt = tmp_path / "ckpt"
    extra, code, message = _case(name, tmp_path, ckpt, good_checkpoint)
    before = tree_hash(tmp_path)
    proc = cli(cli_args(data_dir, str(ckpt), *extra))
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain_ssa.py")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert tree_hash(tmp_path) == before
    assert not (tmp_path / "pwned").exists(), "a crafted checkpoint executed code"


def test_rerun_resumes_and_overwrite_starts_afresh(
    data_dir: str, good_checkpoint: Path, tmp_path: Path
) -> None:
    from ssa_megatron.training.metrics import parse_rows

    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    # The same command again (checkpoint.load auto, the default): continues at iteration 3.
    again = cli(cli_args(data_dir, str(ckpt)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "iter_0000002" in again.stdout
    assert [r["iteration"] for r in parse_rows(again.stdout)] == [f"{i}/{ITERS}" for i in (3, 4)]
    # An explicit overwrite: the earlier run's checkpoints go, training starts at iteration 1.
    fresh = cli(cli_args(data_dir, str(ckpt), "--checkpoint.load", "none", "--checkpoint.overwrite", "true"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "removed the earlier run's checkpoints" in fresh.stdout
    assert parse_rows(fresh.stdout)[0]["iteration"] == f"1/{ITERS}"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
