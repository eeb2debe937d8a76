"""get_ssa_layer_spec: a megatron ``TransformerLayer`` ModuleSpec with SSA self-attention.

Local backend (pure megatron-core ``ColumnParallelLinear``/``RowParallelLinear``/norms) is the tested
one. With Transformer Engine importable (``use_te=None`` then picks it, ``use_te=True`` demands it) the
linear and norm layers come from TE's spec provider; the input norm stays a separate module (not fused
into the QKV projection) because the gate projection needs the normalised hidden state too. TE is not
installed on this project's CPU or GPU machines, so the TE variant is untested here.

With ``model.fused_ops`` on (``fused_ops.fused_ops_enabled``), the local spec's RMSNorms (the layers'
and the final one) and its MLP are Liger's fused ones (``ssa_megatron.model.fused_ops``), with the
same parameter names; ``get_ssa_decoder_spec`` is then a block spec, to carry the final norm.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from ssa_megatron.model import fused_ops
from ssa_megatron.model.attention import SSACoreAttention, SSASelfAttention, SSASelfAttentionSubmodules
from ssa_megatron.model.config import SSATransformerConfig


def te_available() -> bool:
    """Whether Transformer Engine (and megatron's TE spec provider) can be imported."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider  # noqa: F401
    except ImportError:
        return False
    return True


def _backend(use_te: bool | None) -> BackendSpecProvider:
    have_te = te_available()
    if use_te and not have_te:
        raise ImportError("use_te=True but transformer_engine is not importable; install it or use_te=False")
    if use_te or (use_te is None and have_te):
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def get_ssa_layer_spec(config: SSATransformerConfig, use_te: bool | None = None) -> ModuleSpec:
    """ModuleSpec of one SSA transformer layer (pre-norm, SSA attention, megatron's dense MLP)."""
    if not isinstance(config, SSATransformerConfig):
        raise TypeError(f"get_ssa_layer_spec needs an SSATransformerConfig; got {type(config).__name__}")
    backend = _backend(use_te)
    rms = config.normalization == "RMSNorm"
    norm = backend.layer_norm(rms_norm=rms, for_qk=False)
    mlp = get_mlp_module_spec_for_backend(backend=backend)
    if _fused(config, backend):
        norm = fused_ops.FusedRMSNorm
        mlp = fused_ops.FusedSwiGLUMLP
    # TE's MLP spec fuses the pre-MLP norm into fc1; the local one needs it as its own module.
    pre_mlp_norm = IdentityOp if backend.fuse_layernorm_and_linear() else norm
    attention = ModuleSpec(
        module=SSASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SSASelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=SSACoreAttention,
            linear_proj=backend.row_parallel_linear(),
            linear_gate=backend.column_parallel_linear(),
        ),
    )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_ssa_decoder_spec(
    config: SSATransformerConfig, use_te: bool | None = None, vp_stage: int | None = None
) -> ModuleSpec | TransformerBlockSubmodules:
    """The decoder spec ``GPTModel`` takes: the layer spec, or with the fused ops a block spec of this
    pipeline stage's (``vp_stage``'s) layers whose final norm is the fused one (from a layer spec
    megatron would pick its default norm for it)."""
    layer = get_ssa_layer_spec(config, use_te=use_te)
    if not _fused(config, _backend(use_te)):
        return layer
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage), layer_norm=fused_ops.FusedRMSNorm
    )


def _fused(config: SSATransformerConfig, backend: BackendSpecProvider) -> bool:
    # Liger replaces the local spec's torch ops; TE's fused layers are left as they are.
    local = isinstance(backend, LocalSpecProvider)
    return local and config.normalization == "RMSNorm" and fused_ops.fused_ops_enabled(config)
