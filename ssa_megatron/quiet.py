"""Quiet the import-time chatter of megatron, torch and DeepSpeed that says nothing about the user's run.

Imports only the standard library, so an entry point can call it before it loads anything heavy.
"""

from __future__ import annotations

import logging
import warnings


def quiet_third_party() -> None:
    """Silence import-time chatter of megatron and torch that says nothing about the user's run.

    Call it at module level of a tool script: processes spawned by the tool re-import that module, so the
    filters reach them too.
    """
    # megatron falls back from Transformer Engine / Apex to plain torch, and deprecates its own APIs.
    fallback = ".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed"
    warnings.filterwarnings("ignore", message=fallback)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron(\.|$)")
    warnings.filterwarnings("ignore", message=r".*\bdeprecated\b", module=r"megatron(\.|$)")
    # megatron's dist_checkpointing saves ShardedTensors, which torch's checkpoint planner deprecates.
    warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor", category=FutureWarning)
    # torch's extension loader logs this at import on any machine without a CUDA toolkit.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # DeepSpeed (imported by transformers/accelerate) announces its CPU fallback on its own logger, whose
    # level it sets itself at import; a filter on the logger survives that.
    logging.getLogger("DeepSpeed").addFilter(
        lambda record: not record.getMessage().startswith("Setting accelerator to CPU")
    )
