"""Fused non-attention ops from Liger-Kernel (Triton): RMSNorm, SwiGLU and the LM head's linear +
cross entropy, chosen by ``model.fused_ops`` (``fused_ops_enabled`` is the one place it is read).

megatron's local spec runs these as separate PyTorch kernels: ``torch.nn.RMSNorm``, a chunk + SiLU +
multiply for the gated MLP, and for the loss an output projection to bf16 logits, a copy to fp32 and
megatron's vocab-parallel cross entropy (with a 128k vocabulary, several GB of logits per 8k-token
micro-batch). Liger's kernels do each in one pass; its linear cross entropy projects the hidden
states chunk by chunk and computes the input and weight gradients in the forward, so the full
logits never exist.

The modules here keep megatron's parameter names (``weight`` of a norm, ``linear_fc1``/``linear_fc2``
of the MLP), so checkpoints and the HF conversion see the same model. They run Liger's kernels on
CUDA tensors (and on CPU under ``TRITON_INTERPRET=1``, for tests) and megatron's own computation
otherwise, so a model built on a CUDA machine still runs on CPU tensors. Liger is imported only when
a kernel runs: without it (no ``[gpu]`` extra) ``auto`` is off.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP
from torch import Tensor

logger = logging.getLogger(__name__)

# Label of the tokens the loss mask drops: Liger's cross entropy gives them loss 0 and no gradient.
IGNORE_INDEX = -100
# Liger bounds its transient logits to CHUNK_MEM_CONST x tokens x hidden elements. Its default (1)
# splits an 8k-token micro-batch of a 2048-wide, 128k-vocabulary model into 32 chunks, and each chunk
# reads and writes the whole fp32 weight-gradient accumulator (1 GB); 32 gives 2 chunks of 4096 tokens
# (1 GB of bf16 logits at a time, against 6 GB of bf16 + fp32 logits unfused).
CHUNK_MEM_CONST = 32


@functools.cache
def liger_available() -> bool:
    """Whether liger-kernel is importable (the ``[gpu]`` extra)."""
    return importlib.util.find_spec("liger_kernel") is not None


def fused_ops_enabled(config: Any) -> bool:
    """Whether a model built from ``config`` (``SSATransformerConfig``) uses the fused ops.

    ``off``: never. ``auto``: when CUDA is available and liger-kernel is installed; on a CPU machine
    the model is megatron's local one, bit for bit.
    """
    if config.fused_ops == "off" or not torch.cuda.is_available():
        return False
    if not liger_available():
        _warn_no_liger()
        return False
    return True


def fused_lm_loss_enabled(config: Any) -> bool:
    """Whether the LM head's loss is fused: only when the output layer holds the whole vocabulary
    (TP=1); a vocabulary split over TP ranks keeps megatron's vocab-parallel cross entropy."""
    return fused_ops_enabled(config) and config.tensor_model_parallel_size == 1


@functools.cache
def _warn_no_liger() -> None:
    logger.warning(
        "model.fused_ops=auto: liger-kernel is not installed, so RMSNorm, SwiGLU and the LM loss run "
        "megatron's unfused ops; install it with `pip install -e .[gpu]` (or set model.fused_ops=off)"
    )


def runs_triton(x: Tensor) -> bool:
    """Whether Liger's Triton kernels can take ``x``: a CUDA tensor, or any under ``TRITON_INTERPRET=1``."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


class FusedRMSNorm(torch.nn.Module):
    """RMSNorm through Liger's kernel; megatron's norm-builder signature (a drop-in for
    ``WrappedTorchNorm``), the same ``weight`` parameter.

    The call is ``liger_kernel.megatron.LigerMegatronRMSNorm``'s (llama casting: the inverse RMS in
    fp32, not in place, since megatron keeps the input for recomputation); not subclassed, so this
    module imports without liger and runs ``F.rms_norm`` on CPU tensors.
    """

    def __init__(
        self, config: Any, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False, normalization: str = "RMSNorm",
    ) -> None:  # fmt: skip
        super().__init__()
        if normalization != "RMSNorm" or config.normalization != "RMSNorm":
            raise ValueError(f"FusedRMSNorm is an RMSNorm; config.normalization is {config.normalization!r}")
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("FusedRMSNorm has no zero-centered gamma; set model.fused_ops=off for it")
        self.config = config
        self.hidden_size = (hidden_size,)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        # Under sequence parallelism megatron all-reduces the gradient of parameters so marked.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: Tensor) -> Tensor:
        # CUDA only: Liger's RMSNorm kernel does not run in the Triton interpreter.
        if not x.is_cuda:
            return F.rms_norm(x, self.hidden_size, self.weight, self.eps)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "llama", False, None)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size[0]}, eps={self.eps}"


class FusedSwiGLUMLP(MLP):
    """megatron's dense MLP whose SwiGLU (SiLU(gate) * up over fc1's ``[gate | up]`` output) is
    Liger's one-kernel gate-up SiLU-multiply (the kernel ``liger_kernel.megatron.LigerMegatronSwiGLU``
    runs); fc1/fc2 are megatron's. Elementwise per TP shard, so any TP size fits.

    ``submodules`` defaults to the local spec's (``ColumnParallelLinear`` fc1, ``RowParallelLinear``
    fc2), so a layer spec names the bare class: megatron's ``TransformerLayer`` passes its TP group
    only to a ``ModuleSpec`` of exactly ``MLP`` and warns for any other, while the bare class builds
    with the default TP group, the one this project's layers use.
    """

    def __init__(self, config: Any, submodules: Any = None, **kwargs: Any) -> None:
        swiglu = config.gated_linear_unit and config.activation_func is F.silu
        clamp, offset = config.activation_func_clamp_value, config.glu_linear_offset
        if not swiglu or config.add_bias_linear or clamp is not None or offset:
            raise ValueError(
                "FusedSwiGLUMLP is a bias-free SwiGLU (gated SiLU, no clamp or linear offset); this "
                "config's MLP is not: set model.fused_ops=off"
            )
        if submodules is None:
            from megatron.core.models.backends import LocalSpecProvider
            from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend

            submodules = get_mlp_module_spec_for_backend(LocalSpecProvider()).submodules
        super().__init__(config, submodules, **kwargs)

    def forward(
        self, hidden_states: Tensor, per_token_scale: Tensor | None = None, **kwargs: Any
    ) -> tuple[Tensor, Tensor | None]:
        if per_token_scale is not None or not runs_triton(hidden_states):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction

        gate_up, _ = self.linear_fc1(hidden_states)
        shape = gate_up.shape
        act = LigerFusedGateUpSiLUMulFunction.apply(gate_up.reshape(-1, shape[-1]), False)
        return self.linear_fc2(act.view(*shape[:-1], shape[-1] // 2))


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token CE of ``hidden @ weight.T`` through Liger's chunked forward, which also computes the
    gradients for an upstream gradient of 1 per token (no logits are kept for the backward).

    The input gradient of token i depends on token i's upstream gradient alone, so it is exact for
    any. The weight gradient sums over tokens, so it is exact when every kept token has the same
    upstream gradient, which the training losses give (a masked mean: mask / token count, times
    megatron's micro-batch and loss scales); a device-side assert refuses any other.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

        loss, _, _, _, grad_hidden, grad_weight, _ = fused_linear_cross_entropy_forward(
            hidden, weight, target, ignore_index=IGNORE_INDEX, reduction="none",
            accum_dtype=torch.float32, chunk_mem_const=CHUNK_MEM_CONST,
        )  # fmt: skip
        ctx.save_for_backward(grad_hidden, grad_weight, target)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        grad_hidden, grad_weight, target = ctx.saved_tensors
        kept = target != IGNORE_INDEX
        grad_loss = grad_loss.float()
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_hidden.float() * grad_loss.unsqueeze(1)).to(grad_hidden.dtype)
        else:
            grad_hidden = None
        if ctx.needs_input_grad[1] and grad_weight is not None:
            # The first kept token's upstream gradient (any token's when none is kept: then the
            # weight gradient is zero anyway); no host sync.
            scale = grad_loss.gather(0, kept.to(torch.int32).argmax().view(1)).view(())
            torch._assert_async(
                torch.all((grad_loss == scale) | ~kept),
                "fused LM loss: the kept tokens' loss gradients differ; the fused weight gradient "
                "needs a uniform masked mean (set model.fused_ops=off for other losses)",
            )
            grad_weight = (grad_weight.float() * scale).to(grad_weight.dtype)
        else:
            grad_weight = None
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Per-token cross entropy of the logits ``hidden @ weight.T``, ``[b, s]`` fp32, as megatron's
    ``compute_language_model_loss`` of the output layer's logits gives it, without the logits.

    ``hidden`` ``[s, b, h]`` (the decoder's output), ``weight`` ``[V, h]`` (the whole vocabulary),
    ``labels``/``loss_mask`` ``[b, s]``. Tokens with ``loss_mask == 0`` get loss 0 (the loss function
    multiplies them by 0) and no gradient.
    """
    s, b, h = hidden.shape
    target = labels.masked_fill(loss_mask == 0, IGNORE_INDEX).transpose(0, 1).reshape(-1)
    loss = _LinearCrossEntropy.apply(hidden.reshape(s * b, h), weight, target)
    return loss.view(s, b).transpose(0, 1).contiguous()
