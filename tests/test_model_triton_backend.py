"""The model gives the same numbers on its fast paths as on the reference: the Triton kernels (CPU
interpreter), and the flash dense path with context-parallel chunks and documents (CPU flash op).

Kernel tests feed the ops tensors they build themselves; this one feeds them what megatron's
attention really hands over (views of the fused QKV projection, roped copies), which is where a
layout assumption once made the sparse branch wrong on the Triton path only. The sparse baseline
mode runs just the sparse branch, whose kernels all run under TRITON_INTERPRET on CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed


def _both_backends(rank: int, world_size: int) -> dict:
    from ssa_megatron.parallel.state import destroy_parallel, initialize_parallel
    from tests.test_model_equivalence import SEED, make_batches, run_step, tiny_config

    # One micro-batch (its second row holds two documents): the interpreter makes every call count.
    batches = make_batches()[:1]
    results, weights = {}, None
    for backend in ("naive", "triton"):
        config = tiny_config("sparse", False, kernel_backend=backend)
        initialize_parallel(seed=SEED)
        results[backend] = run_step(config, batches, weights, iteration=0)
        weights = results[backend]["weights"]
        destroy_parallel()
    return results


def test_sparse_model_matches_reference_on_triton_kernels() -> None:
    (results,) = run_distributed(_both_backends, world_size=1)
    want, got = results["naive"], results["triton"]
    for a, b in zip(got["per_token"], want["per_token"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert set(got["grads"]) == set(want["grads"])
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-5, msg=f"grad {name}")


def _flash_dense_body(rank: int, world_size: int, document_causal: bool) -> None:
    from megatron.core import parallel_state

    import kernels.ssa.triton_ops as triton_ops
    from kernels.ssa import naive
    from kernels.ssa.dense_attention_flash import flash_dense_attention
    from tests.test_model_equivalence import CPU_TOL, _equivalence_body

    def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> tuple:
        # The 1-rank reference on the plain-PyTorch path; the CP=2 run on the flash path, which
        # every half-precision dense call takes on CUDA (here the CPU flash op stands in, through
        # the same autograd Function and segment bookkeeping).
        cp = parallel_state.get_context_parallel_world_size()
        return (flash_dense_attention if cp > 1 else naive.dense_attention)(q, k, v, **kw)

    triton_ops.dense_attention = dense
    _equivalence_body(rank, world_size, 1, 1, 2, "triton", CPU_TOL, None, 2, (("full", document_causal),))


@pytest.mark.parametrize("document_causal", [False, True], ids=["causal", "document-causal"])
def test_context_parallel_chunks_on_the_flash_dense_path(document_causal: bool) -> None:
    run_distributed(_flash_dense_body, world_size=2, args=(document_causal,))
