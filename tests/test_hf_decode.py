"""The HF model's decode path: cached block keys + sparse_decode in sparse mode, SDPA in place in full mode.

Greedy generation with the decode path must produce the tokens of re-running the whole sequence in
sparse mode at every step (no cache: block keys, selection and attention over all positions), on the
PyTorch path, on the Triton kernels shipped in an exported directory (CPU interpreter) and on the GPU.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from transformers.cache_utils import DynamicCache

from ssa_megatron.convert.export import ship_kernels
from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.hf.modeling_ssa import (
    SSAForCausalLM,
    SSAStaticCache,
    decode_block_keys_of,
    load_shipped_kernels,
)


def triton_ops(module: object) -> SimpleNamespace:
    """A kernels.ssa package (the shipped copy) forced onto its Triton implementation."""
    names = ("dense_attention", "sparse_attention", "block_keys", "decode_block_keys", "sparse_decode",
             "dense_decode")  # fmt: skip
    return SimpleNamespace(**{n: functools.partial(getattr(module, n), backend="triton") for n in names})


def greedy_pair(model: SSAForCausalLM, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, ...]:
    cache = DynamicCache()
    kw = {"max_new_tokens": new, "do_sample": False, "attention_mode": "sparse", "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, past_key_values=cache, use_cache=True, **kw)
        rerun = model.generate(prompt, use_cache=False, **kw)
    # The decode path ran: every layer kept block keys covering all but the last generated token.
    entries = decode_block_keys_of(cache)
    assert sorted(entries) == list(range(model.config.num_hidden_layers))
    assert {covered for _, covered in entries.values()} == {cached.shape[1] - 1}
    return cached, rerun


def test_greedy_decode_equals_rerunning_sparse_mode_pytorch_path() -> None:
    torch.manual_seed(0)
    model = SSAForCausalLM(tiny_config()).eval()
    prompt = torch.randint(1, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    cached, rerun = greedy_pair(model, prompt, 30)  # 40 tokens: ten blocks of 4 fill while decoding
    assert cached.shape == (3, 40)
    assert torch.equal(cached, rerun)


def test_greedy_decode_equals_rerun_on_the_shipped_triton_kernels(tmp_path) -> None:
    # The exported directory's kernel copy, in the Triton interpreter (use_kernels="always").
    ship_kernels(tmp_path)
    shipped = load_shipped_kernels(str(tmp_path), require_cuda=False)
    assert shipped is not None and hasattr(shipped, "sparse_decode")
    torch.manual_seed(2)
    shape = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1}  # head dim 16 for the tiles
    model = SSAForCausalLM(tiny_config(use_kernels="always", **shape)).eval()
    model.set_attention_ops(triton_ops(shipped))
    prompt = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    cached, rerun = greedy_pair(model, prompt, 6)  # blocks of 4 fill at 12 and 16 tokens
    assert torch.equal(cached, rerun)


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_static_cache_decoding_equals_the_no_cache_forward(mode: str) -> None:
    torch.manual_seed(4)
    model = SSAForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(5))
    cache = SSAStaticCache(model.config, 2, 32)
    with torch.no_grad():
        want = model(ids, use_cache=False, attention_mode=mode).logits
        steps = [model(ids[:, :7], past_key_values=cache, use_cache=True, attention_mode=mode).logits]
        for t in range(7, 30):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, attention_mode=mode)
            steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-5, atol=1e-5)
        # Rewinding and decoding the same token again gives the same logits (block keys stay valid).
        cache.set_length(20)
        again = model(ids[:, 20:21], past_key_values=cache, use_cache=True, attention_mode=mode).logits
        torch.testing.assert_close(again, want[:, 20:21], rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 21


def test_static_cache_refuses_overflow_and_bad_lengths() -> None:
    model = SSAForCausalLM(tiny_config()).eval()
    cache = SSAStaticCache(model.config, 1, 8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"holds 8 tokens but 9 were requested"):
        model(torch.zeros(1, 9, dtype=torch.long), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"length 9 is outside this cache's \[0, 8\]"):
        cache.set_length(9)


@pytest.mark.gpu
def test_greedy_decode_equals_rerun_on_gpu_1b_layout() -> None:
    # 32 query heads, 2 KV heads, head_dim 64, blocks of 16, on the repo's kernels (fp32: exact ranking).
    import kernels.ssa

    torch.manual_seed(6)
    cfg = tiny_config(hidden_size=512, intermediate_size=512, num_attention_heads=32, num_key_value_heads=2,
                      head_dim=64, block_size=16, block_count=4, max_position_embeddings=4096)  # fmt: skip
    model = SSAForCausalLM(cfg).cuda().eval()
    model.set_attention_ops(kernels.ssa)
    prompt = torch.randint(1, 97, (4, 300), generator=torch.Generator().manual_seed(7)).cuda()
    cached, rerun = greedy_pair(model, prompt, 40)
    assert torch.equal(cached, rerun)
    # Full mode's decoding step (split-K dense_decode) gives the no-cache forward's logits.
    ids = cached[:, :320]
    with torch.no_grad():
        want = model(ids, use_cache=False, attention_mode="full").logits[:, -1]
        cache = DynamicCache()
        model(ids[:, :-1], past_key_values=cache, use_cache=True, attention_mode="full")
        got = model(ids[:, -1:], past_key_values=cache, use_cache=True, attention_mode="full").logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_chunked_prefill_equals_one_pass(mode: str) -> None:
    torch.manual_seed(8)
    model = SSAForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 97, (2, 37), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = model(ids, use_cache=False, attention_mode=mode).logits
        # Chunks of 10 tokens (not a multiple of the 4-token blocks), with and without a returned cache.
        got = model(ids, use_cache=False, attention_mode=mode, prefill_chunk_size=10)
        cached = model(ids[:, :36], use_cache=True, attention_mode=mode, prefill_chunk_size=10)
        step = model(ids[:, 36:], past_key_values=cached.past_key_values, use_cache=True, attention_mode=mode)
    assert got.past_key_values is None
    torch.testing.assert_close(got.logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.logits, want[:, :36], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step.logits, want[:, 36:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"prefill_chunk_size must be >= 1 or None, got 0"):
        model(ids, prefill_chunk_size=0)
