"""build_model: megatron's GPTModel with SSA layers, one pipeline stage (or virtual chunk) at a time.

Positions: ``GPTModel.forward(input_ids, position_ids, ...)`` — ``position_ids`` ``[b, s_local]`` (this
CP rank's tokens, as the batch contract gives them) drive RoPE inside the SSA attention and, with
``config.document_causal``, the document boundaries (``position_ids == 0``). Pass them on every
pipeline stage. megatron's own position embedding is off (``position_embedding_type="none"``).

Loss: with ``labels`` the forward returns megatron's per-token cross entropy ``[b, s]``. Given the
``loss_mask`` too (keyword) and with the fused LM loss on (``fused_ops.fused_lm_loss_enabled``: fused
ops and TP=1), the output projection and the cross entropy are one Liger op that never builds the
logits; masked tokens then have loss 0 (the loss function multiplies them by 0).
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from torch import Tensor

from ssa_megatron.model import fused_ops
from ssa_megatron.model.attention import SSAForwardParams, build_forward_params
from ssa_megatron.model.config import SSATransformerConfig, check_sequence_length
from ssa_megatron.model.layer_spec import get_ssa_decoder_spec
from ssa_megatron.model.mode import ModeOverride


class SSAGPTModel(GPTModel):
    """GPTModel whose forward builds the per-forward SSA parameters (mode, RoPE, documents)."""

    # Set only by ``ssa_megatron.model.mode.override_mode`` for the forwards of its scope.
    mode_override: ModeOverride | None = None

    def forward(  # type: ignore[override]
        self,
        input_ids: Tensor | None,
        position_ids: Tensor | None,
        attention_mask: Tensor | None = None,
        decoder_input: Tensor | None = None,
        labels: Tensor | None = None,
        inference_context: object | None = None,
        packed_seq_params: SSAForwardParams | None = None,
        extra_block_kwargs: dict | None = None,
        runtime_gather_output: bool | None = None,
        **kwargs: object,
    ) -> Tensor:
        if packed_seq_params is None:
            packed_seq_params = self.forward_params(input_ids, position_ids)
        return super().forward(
            input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
            inference_context=inference_context, packed_seq_params=packed_seq_params,
            extra_block_kwargs=extra_block_kwargs, runtime_gather_output=runtime_gather_output, **kwargs,
        )

    def _postprocess(  # type: ignore[override]
        self, hidden_states: Tensor, labels: Tensor | None = None, loss_mask: Tensor | None = None,
        **kwargs: object,
    ) -> Tensor:  # fmt: skip
        # megatron calls this with keywords only; its other arguments serve MTP and inference. A stage
        # before the last returns its hidden states (megatron's path).
        fused = (
            self.post_process and labels is not None and loss_mask is not None and not self.mtp_process
            and fused_ops.runs_triton(hidden_states) and fused_ops.fused_lm_loss_enabled(self.config)
        )  # fmt: skip
        if not fused:
            return super()._postprocess(
                hidden_states=hidden_states, labels=labels, loss_mask=loss_mask, **kwargs
            )
        if self.share_embeddings_and_output_weights:
            weight = self.shared_embedding_or_output_weight()
        else:
            weight = self.output_layer.weight
        return fused_ops.linear_cross_entropy(hidden_states, weight, labels, loss_mask)

    def forward_params(self, input_ids: Tensor | None, position_ids: Tensor | None) -> SSAForwardParams:
        """The SSA parameters of the next forward (a training draw needs the published iteration)."""
        shaped = position_ids if position_ids is not None else input_ids
        if shaped is None:
            raise ValueError("SSAGPTModel needs position_ids (or input_ids) on every pipeline stage")
        layers = self.decoder.layers
        schedule_mb = getattr(layers[0], "current_microbatch", None) if len(layers) else None
        return build_forward_params(
            self.config, position_ids, shaped.shape[0], shaped.shape[1], shaped.device, self.training,
            schedule_mb, self.mode_override,
        )


def build_model(
    config: SSATransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    share_embeddings_and_output_weights: bool = True,
    parallel_output: bool = True,
    use_te: bool | None = None,
) -> SSAGPTModel:
    """This rank's SSA GPTModel (stage ``vp_stage`` when virtual pipelining); needs megatron's parallel
    state (``ssa_megatron.parallel.initialize_parallel``). ``pre_process``/``post_process`` default to
    whether this is the first/last pipeline stage."""
    from megatron.core import parallel_state

    if not isinstance(config, SSATransformerConfig):
        raise TypeError(f"build_model needs an SSATransformerConfig; got {type(config).__name__}")
    check_sequence_length(config, max_sequence_length)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return SSAGPTModel(
        config,
        get_ssa_decoder_spec(config, use_te=use_te, vp_stage=vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="none",
        vp_stage=vp_stage,
    )


def build_model_chunks(
    config: SSATransformerConfig, vocab_size: int, max_sequence_length: int, **kwargs: object
) -> list[SSAGPTModel]:
    """One model per virtual pipeline stage (a single-element list without virtual pipelining)."""
    from megatron.core import parallel_state

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None or vpp == 1:
        return [build_model(config, vocab_size, max_sequence_length, **kwargs)]
    return [build_model(config, vocab_size, max_sequence_length, vp_stage=i, **kwargs) for i in range(vpp)]
