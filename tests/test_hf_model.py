"""The standalone HF SSA model: attention vs the kernels' reference, modes, cache, budget, RoPE scaling."""

import pytest
import torch

from kernels.ssa import naive
from ssa_megatron.convert.presets import tiny_config
from ssa_megatron.hf import ssa_attention
from ssa_megatron.hf.modeling_ssa import SSAForCausalLM


@pytest.fixture(scope="module")
def model() -> SSAForCausalLM:
    torch.manual_seed(0)
    return SSAForCausalLM(tiny_config()).eval()


@pytest.mark.parametrize("q_offset", [0, 5, 29])
@pytest.mark.parametrize("block_count", [1, 3, 20])
def test_pytorch_path_matches_kernel_reference(q_offset: int, block_count: int) -> None:
    torch.manual_seed(q_offset * 31 + block_count)
    tk, d = 37, 8
    q = torch.randn(2, tk - q_offset, 6, d)
    k, v = torch.randn(2, tk, 3, d), torch.randn(2, tk, 3, d)
    o, lse, idx = ssa_attention.sparse_attention(q, k, v, 4, block_count, q_offset=q_offset)
    o_ref, lse_ref, idx_ref = naive.sparse_attention(
        q, k, v, 4, block_count, q_offset=q_offset, scale=d**-0.5
    )
    assert torch.equal(idx, idx_ref.long())
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
    o, lse = ssa_attention.dense_attention(q, k, v, q_offset=q_offset)
    o_ref, lse_ref = naive.dense_attention(q, k, v, q_offset=q_offset, scale=d**-0.5)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)


def test_query_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 40, 4, 8), torch.randn(1, 40, 2, 8), torch.randn(1, 40, 2, 8)
    whole = ssa_attention.sparse_attention(q, k, v, 4, 3)
    monkeypatch.setattr(ssa_attention, "_MAX_SCORE_ELEMENTS", 4 * 40 * 3)  # chunks of 3 queries
    chunked = ssa_attention.sparse_attention(q, k, v, 4, 3)
    assert torch.equal(whole[2], chunked[2])
    for a, b in zip(whole[:2], chunked[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_current_block_always_selected_and_budget_respected() -> None:
    torch.manual_seed(2)
    q, k = torch.randn(1, 50, 4, 8), torch.randn(1, 50, 2, 8)
    idx = ssa_attention.select_blocks(q, ssa_attention.block_keys(k, 5), 5, 4)
    pos = torch.arange(50)
    assert torch.equal(idx.max(dim=-1).values, (pos // 5).view(1, 50, 1).expand(1, 50, 2))
    counts = (idx >= 0).sum(-1)
    assert torch.equal(counts, torch.minimum(pos // 5 + 1, torch.tensor(4)).view(1, 50, 1).expand(1, 50, 2))


def test_sparse_differs_from_full_and_large_budget_equals_full(model: SSAForCausalLM) -> None:
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sparse = model(ids, use_cache=False).logits
        full = model(ids, use_cache=False, attention_mode="full").logits
        covering = model(ids, use_cache=False, block_count=10).logits  # 40 tokens = 10 blocks of 4
    assert (sparse - full).abs().max() > 1e-3
    torch.testing.assert_close(covering, full, rtol=1e-5, atol=1e-5)
    # The first block_count blocks see everything either way.
    torch.testing.assert_close(sparse[:, :12], full[:, :12], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_cached_decoding_equals_no_cache_forward(model: SSAForCausalLM, mode: str) -> None:
    ids = torch.randint(0, 97, (2, 41), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(ids, use_cache=False, attention_mode=mode).logits
        out = model(ids[:, :13], use_cache=True, attention_mode=mode)
        pieces, cache = [out.logits], out.past_key_values
        for start, stop in [(13, 14), (14, 17), *[(t, t + 1) for t in range(17, 41)]]:
            out = model(ids[:, start:stop], past_key_values=cache, use_cache=True, attention_mode=mode)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sparse", "full"])
def test_generate_with_cache_equals_without(model: SSAForCausalLM, mode: str) -> None:
    prompt = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    kw = {"max_new_tokens": 30, "do_sample": False, "attention_mode": mode, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (2, 39)
    assert torch.equal(cached, uncached)


def test_block_count_at_load_time_equals_call_time(model: SSAForCausalLM, tmp_path) -> None:
    model.save_pretrained(tmp_path)
    loaded = SSAForCausalLM.from_pretrained(tmp_path, block_count=5, attention_mode="sparse")
    assert loaded.config.block_count == 5
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        at_load = loaded(ids, use_cache=False).logits
        at_call = model(ids, use_cache=False, block_count=5).logits
        default = model(ids, use_cache=False).logits
    torch.testing.assert_close(at_load, at_call, rtol=0, atol=0)
    assert (at_call - default).abs().max() > 1e-4


def test_linear_rope_scaling_interpolates_positions() -> None:
    torch.manual_seed(7)
    base = SSAForCausalLM(tiny_config()).eval()
    scaled = SSAForCausalLM(tiny_config(rope_scaling={"type": "linear", "factor": 2.0})).eval()
    scaled.load_state_dict(base.state_dict())
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(8))
    pos = torch.arange(24).unsqueeze(0)
    with torch.no_grad():
        a = scaled(ids, position_ids=2 * pos, use_cache=False, attention_mode="full").logits
        b = base(ids, position_ids=pos, use_cache=False, attention_mode="full").logits
        c = base(ids, position_ids=2 * pos, use_cache=False, attention_mode="full").logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (c - b).abs().max() > 1e-3


def test_rope_settings_read_the_same_from_transformers_4_and_5_layouts() -> None:
    # transformers 5 writes one `rope_parameters` dict (base included, rope_type "default" when unscaled);
    # 4.x writes `rope_theta` + `rope_scaling` (None when unscaled). Either config.json must give the same
    # model on either version; the dict's base wins over a top-level rope_theta, as in transformers 5.
    torch.manual_seed(12)
    v4 = tiny_config(rope_theta=5000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    v5 = tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    assert v5.rope_theta == 5000.0 and v5.rope_scaling["factor"] == 2.0
    a, b = SSAForCausalLM(v4).eval(), SSAForCausalLM(v5).eval()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.model.rotary_emb.inv_freq, b.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert torch.equal(a(ids, use_cache=False).logits, b(ids, use_cache=False).logits)
    plain = tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    assert plain.rope_scaling is None and plain.rope_theta == 5000.0
    assert tiny_config(rope_scaling={"rope_type": "default"}).rope_scaling is None


def test_use_kernels_at_load_time_sets_the_config_field(model: SSAForCausalLM, tmp_path) -> None:
    # transformers' own from_pretrained(use_kernels=...) (Hub kernels, a bool) must not swallow ours.
    model.save_pretrained(tmp_path)
    for value in ("never", "always"):
        assert SSAForCausalLM.from_pretrained(tmp_path, use_kernels=value).config.use_kernels == value
    with pytest.raises(ValueError, match="'sometimes'"):
        SSAForCausalLM.from_pretrained(tmp_path, use_kernels="sometimes")


def test_loss_is_shifted_cross_entropy(model: SSAForCausalLM) -> None:
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = model(ids, labels=ids, use_cache=False)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_bad_settings_are_refused_with_the_value(model: SSAForCausalLM) -> None:
    ids = torch.randint(0, 97, (1, 8))
    with pytest.raises(ValueError, match="'dense'"):
        model(ids, attention_mode="dense")
    with pytest.raises(ValueError, match="block_count must be >= 1, got 0"):
        model(ids, block_count=0)
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="nope"):
        SSAForCausalLM(tiny_config(rope_scaling={"rope_type": "nope"}))


class _TritonOps:
    """kernels.ssa forced onto its Triton implementation (run by the interpreter on CPU)."""

    @staticmethod
    def dense_attention(*args, **kwargs):
        import kernels.ssa

        return kernels.ssa.dense_attention(*args, backend="triton", **kwargs)

    @staticmethod
    def sparse_attention(*args, **kwargs):
        import kernels.ssa

        return kernels.ssa.sparse_attention(*args, backend="triton", **kwargs)


def test_model_on_triton_kernels_matches_pytorch_path_with_cache() -> None:
    torch.manual_seed(10)
    shape = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1}  # head dim 16 for the tiles
    ref = SSAForCausalLM(tiny_config(use_kernels="never", **shape)).eval()
    model = SSAForCausalLM(tiny_config(use_kernels="always", **shape)).eval()
    model.load_state_dict(ref.state_dict())
    model.set_attention_ops(_TritonOps())
    ids = torch.randint(0, 97, (1, 36), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        for mode in ("sparse", "full"):
            want = ref(ids, use_cache=False, attention_mode=mode).logits
            out = model(ids[:, :33], use_cache=True, attention_mode=mode)
            steps, cache = [out.logits], out.past_key_values
            for t in range(33, 36):
                out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, attention_mode=mode)
                steps.append(out.logits)
            torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-4, atol=1e-4)
