"""model.fused_ops: Liger's RMSNorm, SwiGLU and LM-head linear + cross entropy against megatron's ops.

CPU: the setting, the spec it selects, and the SwiGLU and loss kernels in the Triton interpreter
(conftest sets TRITON_INTERPRET; Liger's RMSNorm kernel does not run there, so its CPU module takes
``F.rms_norm``). GPU (``pytest -m gpu tests/test_fused_ops.py``): each op forward and backward in bf16
and fp32 on fresh random inputs, and a training step of a 2-layer model of the 1B layout (hidden 2048,
FFN 8192, 32/2 heads, vocabulary 128256), fused vs off.
"""

from __future__ import annotations

import pytest
import torch

from ssa_megatron.model import fused_ops
from ssa_megatron.model.config import ConfigError, ModelConfig
from ssa_megatron.training.engine import loss_func
from tests.test_model_equivalence import VOCAB, tiny_config


@pytest.fixture
def fused_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused_ops=auto`` as on a CUDA machine with liger-kernel (CPU tests run its kernels interpreted)."""
    pytest.importorskip("liger_kernel")
    monkeypatch.setattr(fused_ops, "fused_ops_enabled", lambda config: config.fused_ops != "off")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    tokens, positions, labels = batch["tokens"], batch["position_ids"], batch["labels"]
    out = model(tokens, positions, None, labels=labels, loss_mask=batch["loss_mask"])
    loss, _ = loss_func(batch["loss_mask"], out)
    loss.backward()
    # Parameters of the branch a full-mode step does not run have no gradient (None in both models).
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _batch(vocab: int, batch: int, seq: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
    loss_mask = (torch.rand(batch, seq, generator=gen) > 0.2).float()
    out = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": loss_mask,
           "position_ids": torch.arange(seq).expand(batch, seq).contiguous()}  # fmt: skip
    return {k: v.to(device) for k, v in out.items()}


# --- the setting -----------------------------------------------------------------------------------------


def test_fused_ops_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"model\.fused_ops='on' is not one of auto, off"):
        ModelConfig(fused_ops="on").validate()
    with pytest.raises(ValueError, match="fused_ops='fast'"):
        tiny_config(fused_ops="fast")


def test_auto_needs_cuda_and_liger(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not fused_ops.fused_ops_enabled(tiny_config())  # off unless asked for
    config = tiny_config(fused_ops="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fused_ops, "liger_available", lambda: True)
    assert not fused_ops.fused_ops_enabled(config)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fused_ops.fused_ops_enabled(config)
    assert not fused_ops.fused_ops_enabled(tiny_config(fused_ops="off"))
    # The loss only where the output layer holds the whole vocabulary.
    assert fused_ops.fused_lm_loss_enabled(config)
    assert not fused_ops.fused_lm_loss_enabled(tiny_config(tp=2, fused_ops="auto"))
    monkeypatch.setattr(fused_ops, "liger_available", lambda: False)
    assert not fused_ops.fused_ops_enabled(config)


def test_cpu_machine_builds_megatron_ops(single_rank: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron.core.transformer.mlp import MLP

    from ssa_megatron.model.gpt import build_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = build_model(tiny_config("full", fused_ops="auto"), VOCAB, 64)
    layer = model.decoder.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.RMSNorm)
    assert isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm)
    assert type(layer.mlp) is MLP


# --- CPU: the spec and the interpreted kernels -------------------------------------------------------------


def test_fused_spec_keeps_megatron_parameter_names(single_rank: None, fused_on: None) -> None:
    from ssa_megatron.model.gpt import build_model

    fused = build_model(tiny_config("full", fused_ops="auto"), VOCAB, 64)
    plain = build_model(tiny_config("full", fused_ops="off"), VOCAB, 64)
    layer = fused.decoder.layers[0]
    assert isinstance(layer.input_layernorm, fused_ops.FusedRMSNorm)
    assert isinstance(layer.pre_mlp_layernorm, fused_ops.FusedRMSNorm)
    assert isinstance(fused.decoder.final_layernorm, fused_ops.FusedRMSNorm)
    assert isinstance(layer.mlp, fused_ops.FusedSwiGLUMLP)
    assert not isinstance(plain.decoder.layers[0].mlp, fused_ops.FusedSwiGLUMLP)
    shapes = {n: p.shape for n, p in fused.named_parameters()}
    assert shapes == {n: p.shape for n, p in plain.named_parameters()}
    assert set(fused.state_dict()) == set(plain.state_dict())


def test_fused_model_matches_megatron_on_cpu(single_rank: None, fused_on: None) -> None:
    """fp32 training step of a tiny model: Liger's SwiGLU and linear cross entropy (interpreted), the
    fused norm's CPU path, against the same weights in megatron's modules."""
    from ssa_megatron.model.gpt import build_model

    fused = build_model(tiny_config("full", fused_ops="auto"), VOCAB, 64).train()
    plain = build_model(tiny_config("full", fused_ops="off"), VOCAB, 64).train()
    plain.load_state_dict(fused.state_dict())
    batch = _batch(VOCAB, 2, 64)
    loss, grads = _loss_and_grads(fused, batch)
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert _rel(grads[name], ref) < 1e-4, name


def test_fused_loss_only_on_the_last_stage(single_rank: None, fused_on: None) -> None:
    """A pipeline stage without the output layer hands its hidden states on, labels or not."""
    from ssa_megatron.model.gpt import build_model

    config = tiny_config("full", fused_ops="auto")
    first_stage = build_model(config, VOCAB, 64, pre_process=True, post_process=False)
    batch = _batch(VOCAB, 2, 64)
    out = first_stage(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                      loss_mask=batch["loss_mask"])  # fmt: skip
    assert out.shape == (64, 2, 64)


def _megatron_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """megatron's LM loss at TP=1: logits in the weights' dtype, vocab-parallel CE in fp32, ``[b, s]``."""
    from megatron.core import tensor_parallel

    logits = hidden @ weight.t()
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t().contiguous()).t()


def _loss_case(vocab: int, hidden_size: int, seq: int, batch: int, dtype: torch.dtype, device: str) -> tuple:
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(seq, batch, hidden_size, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    mask = (torch.rand(batch, seq, generator=gen) > 0.25).float().to(device)
    return hidden, weight, labels, mask


def _compare_loss(vocab: int, hidden_size: int, seq: int, batch: int, dtype: torch.dtype, device: str,
                  tol: float) -> None:  # fmt: skip
    hidden, weight, labels, mask = _loss_case(vocab, hidden_size, seq, batch, dtype, device)
    per_token = fused_ops.linear_cross_entropy(hidden, weight, labels, mask)
    assert per_token.shape == (batch, seq) and per_token.dtype == torch.float32
    assert torch.all(per_token[mask == 0] == 0)
    loss, _ = loss_func(mask, per_token)
    loss.backward()
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    ref_per_token = _megatron_loss(hidden, weight, labels)
    ref_loss, _ = loss_func(mask, ref_per_token)
    ref_loss.backward()
    kept = mask > 0
    assert _rel(per_token[kept], ref_per_token[kept]) < tol
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert _rel(grads[0], hidden.grad) < tol
    assert _rel(grads[1], weight.grad) < tol


def test_linear_cross_entropy_matches_megatron_on_cpu(single_rank: None) -> None:
    pytest.importorskip("liger_kernel")
    _compare_loss(vocab=300, hidden_size=32, seq=16, batch=2, dtype=torch.float32, device="cpu", tol=1e-5)


def test_linear_cross_entropy_refuses_token_weights(single_rank: None) -> None:
    """The weight gradient is exact only for a uniform masked mean; other weightings fail loudly."""
    pytest.importorskip("liger_kernel")
    hidden, weight, labels, mask = _loss_case(50, 16, 8, 2, torch.float32, "cpu")
    per_token = fused_ops.linear_cross_entropy(hidden, weight, labels, mask)
    weights = torch.linspace(0.5, 1.5, per_token.numel()).view_as(per_token)
    with pytest.raises(RuntimeError, match="uniform masked mean"):
        (per_token * weights).sum().backward()


def test_swiglu_mlp_matches_megatron_on_cpu(single_rank: None) -> None:
    pytest.importorskip("liger_kernel")
    _compare_mlp(torch.float32, "cpu", hidden_size=32, ffn=64, tol=1e-5)


def _compare_mlp(dtype: torch.dtype, device: str, hidden_size: int, ffn: int, tol: float) -> None:
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
    from megatron.core.transformer.mlp import MLP

    config = tiny_config(hidden_size=hidden_size, ffn_hidden_size=ffn, fused_ops="auto")
    submodules = get_mlp_module_spec_for_backend(LocalSpecProvider()).submodules
    ref = MLP(config, submodules).to(device, dtype)
    fused = fused_ops.FusedSwiGLUMLP(config, submodules).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 2, hidden_size, generator=gen).to(device, dtype)
    dy = torch.randn(16, 2, hidden_size, generator=gen).to(device, dtype)
    outs = []
    for module in (fused, ref):
        xi = x.clone().requires_grad_()
        y, bias = module(xi)
        assert bias is None
        y.backward(dy)
        outs.append((y, xi.grad, module.linear_fc1.weight.grad, module.linear_fc2.weight.grad))
    for got, want in zip(*outs, strict=True):
        assert _rel(got, want) < tol


# --- GPU -------------------------------------------------------------------------------------------------

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _tol(dtype: torch.dtype) -> float:
    # Relative L2 error; fp32 differs by summation order only (chunked vs whole matmuls, kernel reductions).
    return 1e-4 if dtype == torch.float32 else 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_megatron_gpu(dtype: torch.dtype) -> None:
    pytest.importorskip("liger_kernel")
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = tiny_config(hidden_size=2048, num_attention_heads=32, fused_ops="auto")
    ref = WrappedTorchNorm(config, 2048, eps=1e-5).to("cuda", dtype)
    fused = fused_ops.FusedRMSNorm(config, 2048, eps=1e-5).to("cuda", dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        fused.weight.copy_(ref.weight)
    x = torch.randn(512, 2, 2048, device="cuda", dtype=dtype) * 3
    dy = torch.randn_like(x)
    outs = []
    for module in (fused, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(dy)
        outs.append((y, xi.grad, module.weight.grad))
    for got, want in zip(*outs, strict=True):
        assert _rel(got, want) < _tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_mlp_matches_megatron_gpu(single_rank: None, dtype: torch.dtype) -> None:
    pytest.importorskip("liger_kernel")
    _compare_mlp(dtype, "cuda", hidden_size=1024, ffn=4096, tol=_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_matches_megatron_gpu(single_rank: None, dtype: torch.dtype) -> None:
    pytest.importorskip("liger_kernel")
    # An odd vocabulary and several Liger chunks (its chunking depends on vocabulary / hidden size).
    _compare_loss(50257, hidden_size=512, seq=1024, batch=2, dtype=dtype, device="cuda", tol=_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_step_fused_vs_off_gpu(single_rank: None, dtype: torch.dtype) -> None:
    """Loss and gradient norms of one training step of the 1B layout (2 of its 16 layers), model.fused_ops
    auto (Liger) vs off, from the same weights."""
    pytest.importorskip("liger_kernel")
    from megatron.core.transformer.module import Float16Module

    from ssa_megatron.model.gpt import build_model

    vocab, seq = 128256, 1024
    shape = dict(num_layers=2, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                 num_query_groups=2, kernel_backend="auto", bf16=dtype == torch.bfloat16)  # fmt: skip
    configs = tiny_config("full", fused_ops="auto", **shape), tiny_config("full", fused_ops="off", **shape)
    assert fused_ops.fused_lm_loss_enabled(configs[0]) and not fused_ops.fused_ops_enabled(configs[1])
    models = [build_model(config, vocab, seq) for config in configs]
    models[1].load_state_dict(models[0].state_dict())
    if dtype == torch.bfloat16:
        models = [Float16Module(config, model) for config, model in zip(configs, models, strict=True)]
    batch = _batch(vocab, 1, seq, "cuda")
    results = []
    for model in models:
        model.cuda().train()
        results.append(_loss_and_grads(model, batch))
        model.cpu()
    (loss, grads), (ref_loss, ref_grads) = results
    assert grads.keys() == ref_grads.keys()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref_loss.item()) <= tol * ref_loss.item()
    norm = torch.stack([g.norm() for g in grads.values()]).norm()
    ref_norm = torch.stack([g.norm() for g in ref_grads.values()]).norm()
    assert abs(norm.item() - ref_norm.item()) <= tol * ref_norm.item()
    for name, ref in ref_grads.items():
        assert _rel(grads[name], ref) < 10 * tol, name
