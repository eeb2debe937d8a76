"""Evaluation math against hand-computed values on tiny inputs."""

import math

import pytest
import torch

from ssa_megatron.evaluation.data import check_vocab, make_windows
from ssa_megatron.evaluation.metrics import AttentionStatsAccumulator, masked_nll_sum, perplexity
from ssa_megatron.evaluation.passkey import answer_retrieved, build_passkey_sample
from ssa_megatron.hf.ssa_attention import attention_statistics


def test_uniform_attention_has_entropy_log_n_and_full_sparsity_when_budget_covers_prefix() -> None:
    # A zero query scores every key equally: position t attends uniformly over t + 1 keys.
    q = torch.zeros(1, 12, 2, 4)
    k = torch.randn(1, 12, 1, 4, generator=torch.Generator().manual_seed(0))
    stats = attention_statistics(q, k, block_size=4, block_count=3)
    expected = torch.log(torch.arange(1, 13, dtype=torch.float32)).view(1, 12, 1).expand(1, 12, 2)
    torch.testing.assert_close(stats["entropy"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["sparsity"], torch.ones(1, 12, 2))  # 3 blocks cover all 12 keys
    torch.testing.assert_close(stats["kl_sparse_full"], torch.zeros(1, 12, 2))


def test_sparsity_and_kl_match_a_hand_computation() -> None:
    # head dim 1, scale 1: the score of key j is q * k_j. Blocks of 2; the query at t = 5 keeps its own block
    # 2 and, with block_count 2, the earlier block with the higher mean-key score: block 0 (keys 3, 1).
    keys = [3.0, 1.0, -2.0, 0.5, 0.25, -1.0]
    k = torch.tensor(keys).view(1, 6, 1, 1)
    q = torch.ones(1, 6, 1, 1)
    stats = attention_statistics(q, k, block_size=2, block_count=2, scale=1.0)
    e = [math.exp(x) for x in keys]
    share = (e[0] + e[1] + e[4] + e[5]) / sum(e)
    assert stats["sparsity"][0, 5, 0].item() == pytest.approx(share, rel=1e-6)
    assert stats["kl_sparse_full"][0, 5, 0].item() == pytest.approx(-math.log(share), rel=1e-5)
    p = [x / sum(e) for x in e]
    assert stats["entropy"][0, 5, 0].item() == pytest.approx(-sum(x * math.log(x) for x in p), rel=1e-6)
    # t = 3 (block 1, block 0 complete): both blocks fit the budget of 2.
    assert stats["sparsity"][0, 3, 0].item() == pytest.approx(1.0)


def test_perplexity_and_nll() -> None:
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(2 * math.log(7), 2) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(1.0, 0)
    # Uniform logits over 10 classes: NLL is log 10 per scored token; 5 of the 8 targets are scored.
    mask = torch.tensor([[1.0, 1, 0, 1], [0, 1, 1, 0]])
    nll, n = masked_nll_sum(torch.zeros(2, 4, 10), torch.randint(0, 10, (2, 4)), mask)
    assert n == 5 and nll == pytest.approx(5 * math.log(10), rel=1e-6)
    # One confident correct prediction (logit 0 vs -inf elsewhere) costs nothing.
    logits = torch.full((1, 1, 3), float("-inf"))
    logits[0, 0, 2] = 0.0
    assert masked_nll_sum(logits, torch.tensor([[2]]), torch.ones(1, 1)) == (0.0, 1.0)


def test_accumulator_weights_positions_and_averages_layers() -> None:
    acc = AttentionStatsAccumulator()
    ones = torch.ones(1, 2, 2)
    acc.add([{"layer": 0, "sparsity": ones * 0.5, "entropy": ones, "kl_sparse_full": ones * 0.1}])
    acc.add(
        [
            {
                "layer": 0,
                "sparsity": torch.ones(1, 6, 2),
                "entropy": ones.new_full((1, 6, 2), 3.0),
                "kl_sparse_full": torch.zeros(1, 6, 2),
            }
        ]
    )
    acc.add([{"layer": 1, "sparsity": ones * 0.25, "entropy": ones * 2, "kl_sparse_full": ones}])
    summary = acc.summary()
    layer0 = summary["per_layer"][0]
    assert layer0["sparsity"] == pytest.approx((4 * 0.5 + 12 * 1.0) / 16)
    assert layer0["entropy"] == pytest.approx((4 * 1 + 12 * 3) / 16)
    assert summary["mean"]["sparsity"] == pytest.approx((layer0["sparsity"] + 0.25) / 2)
    with pytest.raises(ValueError, match="no attention statistics"):
        AttentionStatsAccumulator().summary()


def test_windows_and_vocab_check() -> None:
    stream = torch.arange(23)
    w = make_windows(stream, 5, max_windows=3)
    assert w.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert make_windows(stream, 5).shape == (4, 5)
    with pytest.raises(ValueError, match="fewer than one window of 30"):
        make_windows(stream, 30)
    with pytest.raises(ValueError, match="token id 22 is outside the model's vocabulary of 20"):
        check_vocab(stream, 20, "val.npy")


def _char_encode(text: str) -> list[int]:
    return [ord(c) % 50 for c in text]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_sample_layout(depth: float) -> None:
    s = build_passkey_sample(_char_encode, 400, depth, "12345")
    assert s.ids.numel() == 400
    assert s.ids[s.answer_start :].tolist() == _char_encode(" 12345")
    needle = _char_encode(" The secret number is 12345.")
    assert s.ids[s.needle_start : s.needle_start + len(needle)].tolist() == needle
    filler_len = 400 - len(
        _char_encode(" The secret number is 12345. Remember it: 12345 is the secret number.")
    )
    filler_len -= len(_char_encode(" What is the secret number? The secret number is")) + 6
    assert s.needle_start == round(depth * filler_len)
    with pytest.raises(ValueError, match="too short"):
        build_passkey_sample(_char_encode, 50, depth, "12345")


def test_answer_retrieved_reads_the_argmax_one_position_earlier() -> None:
    ids = torch.tensor([4, 1, 2, 3])
    logits = torch.zeros(4, 5)
    logits[1, 2] = 1.0  # predicts ids[2]
    logits[2, 3] = 1.0  # predicts ids[3]
    assert answer_retrieved(logits, ids, answer_start=2)
    logits[2, 0] = 2.0
    assert not answer_retrieved(logits, ids, answer_start=2)


def test_mds_split_gives_back_the_packed_document_stream(tmp_path) -> None:
    import numpy as np

    from ssa_megatron.evaluation.data import load_token_stream
    from tests.run_helpers import write_packed_split

    docs = write_packed_split(tmp_path / "val")
    stream = load_token_stream(tmp_path)  # a data root: its val/ split is read
    assert stream.tolist() == np.concatenate(docs).tolist()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"without an MDS index\.json"):
        load_token_stream(tmp_path / "empty")
