"""Config schema: YAML + overrides, and every promised validation error (no processes started)."""

from pathlib import Path

import pytest

from ssa_megatron.training.config import (
    ConfigError,
    data_parallel_size,
    load_config,
    parse_override_args,
)

_BASE = """
model: {num_layers: 4, hidden_size: 64, num_attention_heads: 4, num_query_groups: 2}
data: {path: /tmp/data, tokenizer: /tmp/tok.model, seq_length: 64}
train: {micro_batch_size: 2, global_batch_size: 8, train_iters: 10}
"""


def _write(tmp_path: Path, text: str = _BASE) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path: Path) -> None:
    overrides = parse_override_args(["--model.num_layers", "2", "--optim.lr=3e-4", "--eval.modes", "sparse"])
    cfg = load_config(_write(tmp_path), overrides)
    assert cfg.model.num_layers == 2 and cfg.model.hidden_size == 64
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.eval.modes == ["sparse"]
    assert data_parallel_size(cfg, 4) == 4


def test_override_args_reject_plain_flags() -> None:
    with pytest.raises(ValueError, match="--definitely-not-a-flag"):
        parse_override_args(["--model.num_layers", "2", "--definitely-not-a-flag"])


@pytest.mark.parametrize(
    ("yaml_extra", "overrides", "world", "message"),
    [
        ("", ["--model.num_layerz", "2"], 1, "unknown key model.num_layerz"),
        ("bogus: {a: 1}\n", [], 1, "unknown config section 'bogus'"),
        ("", ["--model.num_layers", "two"], 1, "expected an integer, got 'two'"),
        ("", ["--model.attention_mode", "dense"], 1, "model.attention_mode='dense'"),
        ("", ["--parallel.tensor", "3"], 1, "parallel.tensor=3 must divide"),
        ("", ["--parallel.pipeline", "3"], 1, "not divisible by parallel.pipeline=3"),
        ("", ["--parallel.tensor", "2"], 3, "world size 3 is not divisible"),
        ("", ["--train.global_batch_size", "6"], 2, "global_batch_size=6 is not divisible"),
        ("", ["--train.nan_policy", "ignore"], 1, "nan_policy='ignore'"),
        ("", ["--train.engine", "deepspeed"], 1, "needs a DeepSpeed JSON config"),
        ("", ["--optim.min_lr", "1"], 1, "optim.min_lr=1.0 must lie in"),
        ("", ["--data.seq_length", "66", "--parallel.context", "2"], 1, "divisible by 2 x parallel.context"),
        ("", ["--checkpoint.save_interval", "5"], 1, "needs checkpoint.dir"),
        ("", ["--data.tokenizer", ""], 1, "data.tokenizer is empty"),
        ("", ["--parallel.virtual_pipeline", "2"], 1, "needs parallel.pipeline > 1"),
    ],
)
def test_bad_configs_name_the_problem(
    tmp_path: Path, yaml_extra: str, overrides: list[str], world: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        cfg = load_config(_write(tmp_path, _BASE + yaml_extra), parse_override_args(overrides))
        data_parallel_size(cfg, world)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
