"""Config schema: YAML + overrides, and every promised validation error (no processes started)."""

import re
from pathlib import Path

import pytest

from ssa_megatron.training.config import (
    ConfigError,
    data_parallel_size,
    load_config,
    parse_override_args,
)

_BASE = """
model: {num_layers: 4, hidden_size: 64, num_attention_heads: 4, num_query_groups: 2, block_count: 2}
data: {path: data/shards, tokenizer: data/tok.model, seq_length: 64}
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
        ("", ["--model.alignment_loss", "l1"], 1, "model.alignment_loss='l1' is not one of smooth_l1, mse"),
        ("", ["--model.kernel_backend", "cuda"], 1, "model.kernel_backend='cuda' is not one of auto"),
        ("", ["--model.inference_mode", "dense"], 1, "model.inference_mode='dense' is not one of sparse"),
        ("", ["--model.block_size", "12"], 1, "model.block_size must be a power of two (e.g. 16); got 12"),
        ("", ["--model.inference_block_count", "0"], 1, "model.inference_block_count must be >= 1"),
        ("", ["--optim.lr", "nan"], 1, "optim.lr='nan' is not a finite number"),
        ("", ["--model.p_full", ".inf"], 1, "model.p_full=inf is not a finite number"),
        ("", ["--model.block_count", "4"], 1, "data.seq_length=64 <= model.block_size x model.block_count"),
        ("", ["--model.num_layers", "[1, 2"], 1, "--model.num_layers '[1, 2' is not a valid YAML value"),
        ("logging: {interval: 2, interval: 3}\n", [], 1, "duplicate key 'interval' (first at line 5)"),
    ],
)
def test_bad_configs_name_the_problem(
    tmp_path: Path, yaml_extra: str, overrides: list[str], world: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
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


def test_sequence_covered_by_the_budget_is_fine_for_full_attention(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = load_config(
        _write(tmp_path),
        parse_override_args(["--model.attention_mode", "full", "--model.block_count", "4"]),
        warn=lines.append,
    )
    assert cfg.model.block_count == 4
    # Training in full mode is fine, but sparse evaluation at this length would be full attention.
    assert len(lines) == 1 and "model.block_size x inference block count = 16 x 4 = 64" in lines[0]


def test_inference_budget_covering_the_sequence_warns_once(tmp_path: Path) -> None:
    lines: list[str] = []
    overrides = parse_override_args(["--model.inference_block_count", "8"])
    load_config(_write(tmp_path), overrides, warn=lines.append)
    assert len(lines) == 1 and "lower model.inference_block_count" in lines[0]
    lines.clear()
    load_config(_write(tmp_path), warn=lines.append)
    assert lines == []
    # No sparse inference anywhere: nothing to warn about.
    args = ["--model.inference_block_count", "8", "--model.inference_mode", "full", "--eval.modes", "full"]
    load_config(_write(tmp_path), parse_override_args(args), warn=lines.append)
    assert lines == []


def test_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, _BASE + "train: {seed: [1,\n"))
    assert "invalid YAML" in str(err.value) and "\n" not in str(err.value)


def test_duplicate_section_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate key 'train'"):
        load_config(_write(tmp_path, _BASE + "train: {seed: 3}\n"))


def test_non_finite_inside_nested_values_is_refused(tmp_path: Path) -> None:
    from ssa_megatron.training.config import TrainConfig, validate_static

    cfg = load_config(_write(tmp_path))
    assert isinstance(cfg, TrainConfig)
    cfg.eval.modes = ["sparse"]
    cfg.data.streams = [{"path": "data/shards", "proportion": float("nan")}]
    with pytest.raises(ConfigError, match=r"data\.streams\[0\]\.proportion=nan is not a finite number"):
        validate_static(cfg)


def test_model_section_is_the_model_config() -> None:
    from ssa_megatron.model.config import ModelConfig
    from ssa_megatron.training.config import ModelSection, TrainConfig

    assert ModelSection is ModelConfig and isinstance(TrainConfig().model, ModelConfig)
    import ssa_megatron.model.config as model_config
    import ssa_megatron.training.config as training_config

    # Each choice list is defined once.
    assert not hasattr(training_config, "ATTENTION_MODES")
    assert model_config.ATTENTION_MODES == ("ssa", "full", "sparse")


def test_hf_kwargs_round_trip() -> None:
    from ssa_megatron.hf.configuration_ssa import ATTENTION_MODES as HF_MODES
    from ssa_megatron.hf.configuration_ssa import SSAConfig
    from ssa_megatron.model.config import INFERENCE_MODES, ModelConfig, hf_config_kwargs, model_config_from_hf

    # The shipped HF config cannot import this package; its mode list must still be the inference modes.
    assert set(HF_MODES) == set(INFERENCE_MODES)
    model = ModelConfig(num_layers=3, hidden_size=96, ffn_hidden_size=160, num_attention_heads=6,
                        num_query_groups=3, block_size=32, block_count=5, inference_block_count=7,
                        inference_mode="full", rotary_base=10000.0, norm_epsilon=1e-6, init_method_std=0.01,
                        tie_embeddings=False)  # fmt: skip
    kwargs = hf_config_kwargs(model, vocab_size=512, seq_length=1024)
    hf = SSAConfig(**kwargs)
    assert (hf.head_dim, hf.block_count, hf.attention_mode, hf.train_seq_length) == (16, 7, "full", 1024)
    back = model_config_from_hf(hf)
    # The HF model carries the inference budget as its block_count; everything else comes back.
    expected = {**model.__dict__, "block_count": 7, "inference_block_count": None, "kv_channels": 16,
                "vocab_size": 512}  # fmt: skip
    assert back.__dict__ == expected
    assert model_config_from_hf(hf.to_dict()) == back
    back.validate()


def test_transformer_config_derivation() -> None:
    import torch

    from ssa_megatron.model.config import ModelConfig, transformer_config

    model = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        block_count=3, p_full=0.25, inference_mode="full", document_causal=True)  # fmt: skip
    tc = transformer_config(model, precision="bf16", recompute="full", cpu_initialization=True, mode_seed=9)
    assert (tc.kv_channels, tc.block_count, tc.p_full, tc.inference_mode, tc.document_causal) == (
        16, 3, 0.25, "full", True)  # fmt: skip
    assert tc.bf16 and not tc.fp16
    assert tc.params_dtype == torch.bfloat16 and tc.pipeline_dtype == torch.bfloat16
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "uniform", 1)
    assert tc.mode_seed == 9 and tc.use_cpu_initialization and tc.normalization == "RMSNorm"
    conv = transformer_config(model, params_dtype=torch.bfloat16)
    assert not conv.bf16 and conv.params_dtype == torch.bfloat16 and conv.recompute_granularity is None
    with pytest.raises(ValueError, match="precision='bf32' is not one of"):
        transformer_config(model, precision="bf32")
