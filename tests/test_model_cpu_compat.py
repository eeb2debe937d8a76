"""cpu_compat: inert with CUDA, reversible, and megatron's own schedules (incl. PP over gloo) run on CPU."""

from __future__ import annotations

import pytest
import torch

from ssa_megatron.parallel import cpu_compat
from tests.distributed import run_distributed

_PROXIED = cpu_compat._PROXIED_MODULES


def _module_torch(name: str) -> object:
    import importlib

    return importlib.import_module(name).torch


def test_inert_when_cuda_present(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_compat.disable_cpu_compat()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.enable_cpu_compat() is False
    assert not cpu_compat.is_cpu_compat_active()
    for name in _PROXIED:
        assert _module_torch(name) is torch, name
    import megatron.core.tensor_parallel.random as mrandom

    assert not hasattr(mrandom._get_cuda_rng_state, "__wrapped__")
    assert mrandom._get_cuda_rng_state is not cpu_compat._cpu_get_rng_state


def test_enable_is_idempotent_and_reversible() -> None:
    if torch.cuda.is_available():
        pytest.skip("compat is inert with CUDA")
    cpu_compat.disable_cpu_compat()
    import megatron.core.models.common.language_module.language_module as lm

    original = lm.LanguageModule.setup_embeddings_and_output_layer
    try:
        assert cpu_compat.enable_cpu_compat() is True
        patched = len(cpu_compat._patched)
        assert cpu_compat.enable_cpu_compat() is True
        assert len(cpu_compat._patched) == patched
        for name in _PROXIED:
            proxy = _module_torch(name)
            assert proxy is not torch
            assert proxy.cuda.current_device() == torch.device("cpu")
            assert proxy.zeros([], device="cuda").device.type == "cpu"
            assert proxy.tensor([1], device="cpu", pin_memory=True).device.type == "cpu"
            assert proxy.cuda.synchronize() is None
            with proxy.autocast("cuda", dtype=torch.bfloat16):
                assert torch.is_autocast_enabled("cpu")
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        assert "cuda" not in torch.Tensor.__dict__
    finally:
        cpu_compat.disable_cpu_compat()
    for name in _PROXIED:
        assert _module_torch(name) is torch
    assert lm.LanguageModule.setup_embeddings_and_output_layer is original


def test_tracker_fork_uses_its_own_stream_on_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("compat is inert with CUDA")
    from megatron.core.tensor_parallel import random as mrandom

    cpu_compat.enable_cpu_compat()
    try:
        tracker = mrandom.CudaRNGStatesTracker()
        tracker.add("stream", 7)
        torch.manual_seed(0)
        with tracker.fork("stream"):
            a = torch.rand(3)
        after_default = torch.rand(3)
        torch.manual_seed(7)
        expected_stream = torch.rand(3)
        torch.manual_seed(0)
        expected_default = torch.rand(3)
        torch.testing.assert_close(a, expected_stream)
        torch.testing.assert_close(after_default, expected_default)
    finally:
        cpu_compat.disable_cpu_compat()


def _tiny_gpt(pp: int, pre: bool, post: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        gated_linear_unit=True,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        pipeline_model_parallel_size=pp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )
    return GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=16,
        pre_process=pre, post_process=post, share_embeddings_and_output_weights=True,
    )


def _run_schedule(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(output: torch.Tensor):
            loss = output.float().sum()
            count = torch.tensor(output.numel(), dtype=torch.int)
            return loss, count, {"loss": loss.detach() / count}

        return out, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=16, micro_batch_size=2, forward_only=False,
    )
    return [item["loss"] for item in losses]


def _schedules_body(rank: int, world_size: int) -> None:
    from megatron.core import parallel_state

    from ssa_megatron.parallel.state import (
        destroy_parallel,
        gather_full_tensors,
        initialize_parallel,
        load_full_state_dict,
    )

    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, 64, (2, 16), generator=gen)
        batches.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
                        "position_ids": torch.arange(16).expand(2, 16)})

    initialize_parallel(seed=11)  # PP=1, DP=2: each rank computes the reference
    ref = _tiny_gpt(1, True, True)
    full = {k: v.detach().clone() for k, v in ref.named_parameters()}
    ref_losses = _run_schedule(ref, batches)
    ref_grads = gather_full_tensors(ref, grads=True)
    destroy_parallel()

    initialize_parallel(pipeline_parallel=2, seed=12)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    model = _tiny_gpt(2, stage == 0, stage == 1)
    if stage == 1:
        # The tied output layer starts as zeros and is all-reduced with stage 0's embedding
        # (LanguageModule.setup_embeddings_and_output_layer, run through Tensor.cuda on CPU).
        assert model.output_layer.weight.abs().sum() > 0
    load_full_state_dict(model, full)
    losses = _run_schedule(model, batches)
    grads = gather_full_tensors(model, grads=True)
    destroy_parallel()

    if stage == 1:
        for got, want in zip(losses, ref_losses):
            torch.testing.assert_close(got, want)
    grads["embedding.word_embeddings.weight"] += grads.pop("output_layer.weight")
    assert set(grads) == set(ref_grads)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, msg=name)


def test_megatron_schedules_no_pipelining_and_pp2_on_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU path; the GPU path is megatron's own")
    run_distributed(_schedules_body, world_size=2)
