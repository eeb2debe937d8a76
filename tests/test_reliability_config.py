"""Bad config inputs through the real entry point: `pretrain_ssa.py --config FILE [overrides]`.

Each case must exit 2 with one line on stderr that names the bad value, no traceback, before torch or
megatron is imported (so a bad value costs well under a second, never a model build), and leave every
file in the run directory as it was. Also: `--help` lists every config key with its type and default,
and `--print-config` round-trips.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "pretrain_ssa.py"

# Valid: 128 tokens, sparse branch 16 x 4 = 64 of them. Paths are relative to the run directory.
BASE = """\
model:
  num_layers: 2
  hidden_size: 64
  ffn_hidden_size: 128
  num_attention_heads: 4
  num_query_groups: 2
  block_size: 16
  block_count: 4
data:
  path: data
  tokenizer: data/tokenizer.model
  seq_length: 128
parallel:
  distributed_optimizer: false
train:
  micro_batch_size: 2
  global_batch_size: 4
  train_iters: 10
  precision: fp32
  device: cpu
checkpoint:
  dir: runs/${model.attention_mode}
  save_interval: 5
"""


def _run_dir(tmp_path: Path, config_text: str | bytes) -> Path:
    """A run directory with the config and an earlier run's checkpoint pointer in it."""
    config = tmp_path / "config.yaml"
    if isinstance(config_text, bytes):
        config.write_bytes(config_text)
    else:
        config.write_text(config_text)
    (tmp_path / "runs" / "ssa").mkdir(parents=True)
    (tmp_path / "runs" / "ssa" / "latest").write_text("iter_0000005\n")
    return config


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # -X importtime lists every module the run imports on stderr: the proof that the config was
    # refused before torch/megatron were loaded.
    return subprocess.run(
        [sys.executable, "-X", "importtime", str(ENTRY), *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _split_stderr(stderr: str) -> tuple[list[str], list[str]]:
    lines = stderr.splitlines()
    imports = [line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")]
    return imports, [line for line in lines if not line.startswith("import time:")]


def _with(section: str, key: str, value: str) -> str:
    """BASE with one key of one section set to the YAML text ``value``."""
    data = yaml.safe_load(BASE)
    data.setdefault(section, {})[key] = "@@"
    return yaml.safe_dump(data, sort_keys=False).replace("'@@'", value)


# (id, config file text, overrides, text the one-line message must contain)
CASES = [
    ("alignment_loss-typo", BASE, ["--model.alignment_loss", "smoth_l1"], "model.alignment_loss='smoth_l1'"),
    ("kernel_backend-typo", BASE, ["--model.kernel_backend", "trition"], "model.kernel_backend='trition'"),
    ("inference_mode-typo", BASE, ["--model.inference_mode", "dense"], "model.inference_mode='dense'"),
    ("attention_mode-typo", _with("model", "attention_mode", "moba"), [], "model.attention_mode='moba'"),
    ("block_size-not-pow2", BASE, ["--model.block_size", "24"], "model.block_size must be a power of two"),
    ("block_size-zero", _with("model", "block_size", "0"), [], "power of two (e.g. 16); got 0"),
    ("block_count-zero", BASE, ["--model.block_count", "0"], "model.block_count must be >= 1"),
    ("inference_block_count-zero", BASE, ["--model.inference_block_count", "0"],
     "model.inference_block_count must be >= 1 or null (null: block_count); got 0"),
    ("nan-in-file", _with("optim", "lr", ".nan"), [], "optim.lr=nan is not a finite number"),
    ("inf-override", BASE, ["--optim.lr", "inf"], "optim.lr='inf' is not a finite number"),
    ("minus-inf-in-file", _with("model", "p_full", "-.inf"), [], "model.p_full=-inf is not a finite number"),
    ("nan-override-yaml", BASE, ["--train.grad_clip=.nan"], "train.grad_clip=nan is not a finite number"),
    ("inf-for-a-string-key", BASE, ["--checkpoint.load", ".inf"], "checkpoint.load=inf is not a finite"),
    ("yaml-unclosed-flow", BASE + "eval: {modes: [sparse, full}\n", [], "invalid YAML"),
    ("yaml-bad-indent", BASE.replace("  hidden_size: 64", "   hidden_size: 64"), [], "invalid YAML"),
    ("yaml-bad-override", BASE, ["--model.num_layers", "[1, 2"], "--model.num_layers '[1, 2'"),
    ("yaml-bad-override-mapping", BASE, ["--data.path", "{a: 1"], "--data.path '{a: 1'"),
    ("duplicate-key", BASE.replace("  num_layers: 2\n", "  num_layers: 2\n  num_layers: 6\n"), [],
     "duplicate key 'num_layers' (first at line 2)"),
    ("duplicate-section", BASE + "train:\n  seed: 3\n", [], "duplicate key 'train'"),
    ("seq-within-block-budget", BASE, ["--data.seq_length", "64"],
     "data.seq_length=64 <= model.block_size x model.block_count = 16 x 4 = 64"),
    ("seq-within-budget-sparse", BASE, ["--model.attention_mode", "sparse", "--model.block_count", "8"],
     "data.seq_length=128 <= model.block_size x model.block_count = 16 x 8 = 128"),
    ("unknown-key", BASE, ["--model.num_layerz", "2"], "unknown key model.num_layerz"),
    ("unknown-section", BASE + "modle: {num_layers: 2}\n", [], "unknown config section 'modle'"),
    ("not-an-integer", BASE, ["--train.train_iters", "ten"], "expected an integer, got 'ten'"),
    ("not-a-bool", BASE, ["--model.tie_embeddings", "maybe"], "expected true/false, got 'maybe'"),
    ("p_full-range", BASE, ["--model.p_full", "1.5"], "model.p_full=1.5"),
    ("alignment_weight-negative", BASE, ["--model.alignment_weight", "-1"], "model.alignment_weight=-1.0"),
    ("heads-not-multiple", BASE, ["--model.num_query_groups", "3"], "model.num_query_groups=3"),
    ("precision-typo", BASE, ["--train.precision", "fp8"], "train.precision='fp8'"),
    ("top-level-list", "- model\n- data\n", [], "the top level must be a mapping of sections, got list"),
    ("unknown-reference", BASE, ["--checkpoint.dir", "runs/${model.nope}"], "${model.nope} names no config"),
    ("not-utf8", b"model:\n  num_layers: \xff\xfe\n", [], "cannot be read (not UTF-8 text)"),
]  # fmt: skip


@pytest.mark.parametrize(("config_text", "overrides", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, config_text: str | bytes, overrides: list[str], message: str
) -> None:
    config = _run_dir(tmp_path, config_text)
    before = _snapshot(tmp_path)
    proc = _cli(tmp_path, "--config", str(config), *overrides)
    imports, lines = _split_stderr(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("pretrain_ssa.py: config error: "), lines
    assert message in lines[0], lines[0]
    assert not [m for m in imports if m.split(".")[0] in ("torch", "megatron")], "validated after the imports"
    assert proc.stdout == ""
    assert _snapshot(tmp_path) == before


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    before = _snapshot(tmp_path)
    proc = _cli(tmp_path, "--config", "no_such.yaml")
    _, lines = _split_stderr(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "'no_such.yaml' does not exist" in lines[0]
    assert _snapshot(tmp_path) == before


def test_inference_budget_warning_is_one_line(tmp_path: Path) -> None:
    config = _run_dir(tmp_path, BASE)
    proc = _cli(tmp_path, "--config", str(config), "--model.inference_block_count", "8", "--print-config")
    _, lines = _split_stderr(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("pretrain_ssa.py: config warning: data.seq_length=128"), lines
    assert "16 x 8 = 128" in lines[0]


def test_help_lists_every_key_with_type_and_default(tmp_path: Path) -> None:
    import dataclasses

    from ssa_megatron.training.config import TrainConfig, field_comments, yaml_value

    proc = subprocess.run([sys.executable, str(ENTRY), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    defaults = TrainConfig()
    keys = 0
    for section in dataclasses.fields(TrainConfig):
        values = getattr(defaults, section.name)
        for f in dataclasses.fields(values):
            default = yaml_value(getattr(values, f.name))
            entry = [line for line in lines if line.startswith(f"  --{section.name}.{f.name} ")]
            assert len(entry) == 1, f"--{section.name}.{f.name} missing from --help"
            assert entry[0].endswith(f"(default: {default})"), entry[0]
            keys += 1
    assert keys >= 60
    for expected in ("--model.block_size INT (default: 16)", "--train.stop_after INT|null (default: null)",
                     "--eval.modes LIST[STR] (default: [sparse, full])",
                     "--model.p_full FLOAT (default: 0.5)", "--data.path STR (default: '')"):  # fmt: skip
        assert any(line.strip() == expected for line in lines), expected
    text = proc.stdout
    # The documented mechanisms, each in its key's help.
    for needle in ("${section.key}", "--print-config", "resumes from dir/latest", "Weights & Biases",
                   "the next job resumes from the checkpoint"):  # fmt: skip
        assert needle in text, needle
    # The model section is fully described: each key has its comment under it.
    from ssa_megatron.model.config import ModelConfig

    comments = field_comments(ModelConfig)
    assert set(comments) == {f.name for f in dataclasses.fields(ModelConfig)} and all(comments.values())
    # And every other key has one too (the comment above a field is its help: add one with a new key).
    for section in dataclasses.fields(TrainConfig):
        section_type = type(getattr(defaults, section.name))
        missing = [k for k, c in field_comments(section_type).items() if not c]
        assert not missing, f"{section.name}: keys without a comment line above them: {missing}"
    assert "      Tokens per key block (a power of two)." in lines


def test_print_config_round_trips(tmp_path: Path) -> None:
    from ssa_megatron.training.config import load_config, parse_override_args

    config = _run_dir(tmp_path, BASE)
    overrides = ["--model.num_layers", "4", "--eval.modes", "full", "--optim.lr=3e-4",
                 "--logging.tensorboard_dir", "tb/${model.attention_mode}-${model.block_count}"]  # fmt: skip
    before = _snapshot(tmp_path)
    proc = subprocess.run([sys.executable, str(ENTRY), "--config", str(config), *overrides, "--print-config"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(tmp_path) == before
    printed = yaml.safe_load(proc.stdout)
    assert printed["checkpoint"]["dir"] == "runs/ssa" and printed["logging"]["tensorboard_dir"] == "tb/ssa-4"
    assert printed["model"]["num_layers"] == 4 and printed["optim"]["lr"] == pytest.approx(3e-4)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(proc.stdout)
    again = subprocess.run([sys.executable, str(ENTRY), "--config", str(resolved), "--print-config"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0 and again.stdout == proc.stdout
    direct = load_config(config, parse_override_args(overrides))
    assert load_config(resolved).to_dict() == direct.to_dict()
