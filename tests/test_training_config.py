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
        ("", ["--train.gc_interval", "-1"], 1, "train.gc_interval=-1 must be >= 0"),
        ("", ["--train.engine", "deepspeed"], 1, "needs a DeepSpeed JSON config"),
        ("", ["--optim.min_lr", "1"], 1, "optim.min_lr=1.0 must lie in"),
        ("", ["--data.seq_length", "66", "--parallel.context", "2"], 1, "divisible by 2 x parallel.context"),
        ("", ["--checkpoint.save_interval", "5"], 1, "needs checkpoint.dir"),
        ("", ["--data.tokenizer", ""], 1, "data.tokenizer is empty"),
        ("", ["--parallel.virtual_pipeline", "2"], 1, "needs parallel.pipeline > 1"),
        ("", ["--train.recompute", "selective"], 1, "selective recompute of the SSA core attention is not"),
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


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "world"),
    [("tiny_cpu", 1), ("ssa_1b_8k", 64), ("full_1b_8k", 64), ("sparse_1b_8k", 64), ("ssa_300m", 16)],
)
def test_example_configs_validate_for_their_cluster(name: str, world: int) -> None:
    cfg = load_config(ROOT / "examples" / f"{name}.yaml")
    assert data_parallel_size(cfg, world) >= 1
    assert "${" not in str(cfg.checkpoint.dir) and "${" not in str(cfg.logging.tensorboard_dir)


def test_three_way_comparison_is_one_config_line() -> None:
    import yaml

    raw = {
        m: yaml.safe_load((ROOT / "examples" / f"{m}_1b_8k.yaml").read_text())
        for m in ("ssa", "full", "sparse")
    }
    for mode, data in raw.items():
        assert data["model"].pop("attention_mode") == mode
    assert raw["ssa"] == raw["full"] == raw["sparse"]
    dirs = {load_config(ROOT / "examples" / f"{m}_1b_8k.yaml").checkpoint.dir for m in raw}
    assert len(dirs) == 3, "each baseline must write its own checkpoints"


def test_interpolation_rejects_unknown_reference(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"reference \$\{model.nope\} names no config key"):
        load_config(_write(tmp_path), parse_override_args(["--checkpoint.dir", "/ckpt/${model.nope}"]))
