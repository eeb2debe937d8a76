"""The console line (fits 120 columns, Megatron-like columns), the log header's legend, the tqdm bar,
TensorBoard's scalars (train/mode_full is the full-mode share) and per-run TensorBoard directories."""

from __future__ import annotations

import io
from pathlib import Path

from ssa_megatron.training.config import load_config, parse_override_args
from ssa_megatron.training.metrics import (
    LINE_WIDTH,
    MetricsLogger,
    column_legend,
    format_header,
    format_line,
    parse_rows,
    tensorboard_dir,
)


def _cfg(*overrides: str):
    base = ["--data.path", "unused", "--data.tokenizer", "unused", "--logging.tensorboard_dir", "null",
            "--data.seq_length", "512"]  # fmt: skip
    return load_config(None, parse_override_args(base + list(overrides)))


WIDE = {
    "loss": 10.123456,
    "ce_loss": 10.0,
    "align_loss": 1.234e-3,
    "mode": "FSFSFSFS",
    "mode_full": 0.5,
    "lr": 3.0e-4,
    "grad_norm": 12345.678,
    "consumed_tokens": 1.234e12,
    "ms_per_iter": 123456.0,
    "tokens_per_s": 123456.0,
    "tflops": 400.0,
    "mfu": 0.456,
    "mem_gib": 123.45,
    "skipped": 10,
}


def test_row_fits_120_columns_under_its_header() -> None:
    header = format_header()
    line = format_line(250_000, 1_000_000, WIDE, eta_s=3600 * 99)
    assert len(line) <= LINE_WIDTH and len(header) <= LINE_WIDTH, (header, line)
    names = header.split()
    assert names[1:] == ["iteration", "tokens", "ms/it", "eta", "loss", "ce", "align", "lr", "gnorm", "tok/s",
                         "MFU", "full", "mem", "skip"]  # fmt: skip
    cells = line.split()[2:]
    assert cells == ["250000/1000000", "1.2T", "123456", "99h00m", "10.1235", "10.0000", "1.2e-03", "3.0e-04",
                     "12346", "123.5k", "45.6%", "50%", "123.5G", "10"]  # fmt: skip
    # Every cell ends where its header ends (right-aligned), so the table reads as columns.
    assert all(line[: header.index(n) + len(n)].endswith(c) for n, c in zip(names[1:4], cells[:3]))
    # Absent metrics (full-attention runs have no alignment loss; CPU has no MFU) show "-".
    short = format_line(3, 60, {"loss": 5.0, "ce_loss": 5.0, "lr": 1e-3, "skipped": 0}, None).split()[2:]
    assert short[6] == "-" and short[10] == "-" and short[3] == "-"
    legend = column_legend(10.0)
    assert all(len(x) <= LINE_WIDTH for x in legend.splitlines())
    assert "full = share of the step's micro-batches that full attention drove" in legend
    assert "loss = ce + 10 x align" in legend


def test_lines_at_the_interval_with_eta() -> None:
    out = io.StringIO()
    logger = MetricsLogger(_cfg("--logging.interval", "2", "--logging.progress", "lines"), True, 6, out)
    for it in range(1, 7):
        logger.log_step(it, WIDE)
    logger.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == format_header()
    rows = parse_rows(out.getvalue())
    assert [r["iteration"] for r in rows] == ["2/6", "4/6", "6/6"] and rows[0]["ce"] == "10.0000"
    assert [line.split()[2] for line in lines[1:]] == ["2/6", "4/6", "6/6"]
    # Iteration 1 (not printed) set the pace; every printed row has an ETA, the last one zero.
    assert all(line.split()[5] != "-" for line in lines[1:]) and lines[-1].split()[5] == "0m00s"


def test_progress_bar_shows_eta(tmp_path: Path) -> None:
    out = io.StringIO()
    logger = MetricsLogger(_cfg("--logging.interval", "100", "--logging.progress", "bar"), True, 50, out)
    logger.start(0)
    for it in range(1, 4):
        logger.log_step(it, WIDE)
    logger.close()
    text = out.getvalue()
    # tqdm's "elapsed<remaining" and the rate.
    assert "3/50" in text and "<" in text and ("it/s" in text or "s/it" in text), text


def test_tensorboard_per_run_and_mode_full(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt = tmp_path / "run_a"
    cfg = _cfg("--checkpoint.dir", str(ckpt), "--logging.tensorboard_dir", "auto")
    assert tensorboard_dir(cfg) == str(ckpt / "tensorboard")
    assert tensorboard_dir(_cfg("--logging.tensorboard_dir", "auto")) is None
    logger = MetricsLogger(cfg, True, 2, io.StringIO())
    logger.log_step(1, {**WIDE, "mode_full": 0.25})
    logger.log_step(2, {**WIDE, "mode_full": 1.0})
    logger.close()
    events = EventAccumulator(str(ckpt / "tensorboard"))
    events.Reload()
    assert [round(e.value, 6) for e in events.Scalars("train/mode_full")] == [0.25, 1.0]
    assert "train/mode" not in events.Tags()["scalars"]
