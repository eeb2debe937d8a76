"""Let megatron-core 0.16.1's CUDA-only code paths run on CPU (gloo), active only without CUDA.

megatron-core hard-codes CUDA in a handful of places that a CPU run of the SSA model reaches. Rather than
patching torch globally, each affected megatron module gets its own ``torch`` object: a thin proxy of the
real module in which "cuda" device requests mean "cpu". Everything else in the process keeps the real
``torch``. The entries (why each exists):

* ``torch.cuda.current_device()`` -> ``cpu``: tensor-parallel layers and mappings allocate their
  gather/scatter buffers there; p2p communication allocates shape and receive buffers there; the
  rotary embedding puts ``inv_freq`` there; ``utils.GlobalMemoryBuffer`` (megatron's DotProductAttention
  and sequence-parallel all-gathers) allocates its scratch tensors there.
* ``device="cuda"`` (and ``cuda:N``/int) in ``torch.zeros``/``empty``/``ones``/``full``/``tensor``/
  ``arange`` -> ``cpu``, ``pin_memory`` dropped (pinning needs a CUDA driver): ``total_num_tokens`` in
  every schedule of ``pipeline_parallel/schedules.py``; ``transformer/utils.get_default_causal_mask``
  (megatron's own DotProductAttention when no mask is passed; kept so plain megatron GPT runs on CPU too).
* ``torch.autocast("cuda", ...)`` -> ``torch.autocast("cpu", ...)``: ``forward_step`` when
  ``config.enable_autocast`` is set.
* ``torch.cuda.synchronize()`` -> no-op: p2p communication calls it after batched send/recv to guard
  against CUDA stream races; gloo calls on CPU tensors complete before returning.
* the CUDA RNG tracker (``tensor_parallel/random.py``): ``torch.cuda.get_rng_state``/``manual_seed``
  and the private ``_get_cuda_rng_state``/``_set_cuda_rng_state`` -> the CPU default generator. Forking a
  tracked stream therefore swaps the CPU generator's state in and out, which is exactly what the tracker
  does to the GPU generator. Its "CPU RNG state changed within GPU RNG context" warning always fires then
  (the two generators are one), so that single message is filtered while compat is active.
* ``Tensor.cuda()`` inside ``get_pos_emb_on_this_cp_rank`` (the CP RoPE helper builds a pinned index
  and moves it to the GPU) and inside ``LanguageModule.setup_embeddings_and_output_layer`` (moves the
  tied embedding weight to the GPU before all-reducing it across the first and last pipeline stage):
  a method of the tensor class cannot be redirected per module, so these two functions run with
  ``Tensor.cuda`` meaning "stay on CPU" for the duration of the call only.

Pinned to megatron-core 0.16.1: ``enable_cpu_compat`` refuses other versions rather than silently missing
a new CUDA path. It is idempotent; ``disable_cpu_compat`` restores every patched attribute (tests use it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

SUPPORTED_MEGATRON_VERSION = "0.16.1"

# Modules whose global ``torch`` is replaced by the CPU proxy.
_PROXIED_MODULES = (
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.tensor_parallel.random",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
)
# (module, attribute) pairs holding a function that calls ``Tensor.cuda()``; the CP RoPE helper is
# imported by name into the rotary modules, so each binding is wrapped.
_TENSOR_CUDA_FUNCTIONS = (
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "get_pos_emb_on_this_cp_rank"),
    ("megatron.core.models.common.embeddings.yarn_rotary_pos_embedding", "get_pos_emb_on_this_cp_rank"),
)
_TENSOR_CUDA_METHODS = (
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer"),
)
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"

# Every (owner, attribute, original value) replaced, so disable restores exactly these.
_patched: list[tuple[Any, str, Any]] = []
_log_filter: logging.Filter | None = None


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, an int) to CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if device is not None and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapped


def _autocast(device_type: str, *args: Any, **kwargs: Any) -> torch.autocast:
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _cpu_get_rng_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


class _CudaRandomAsCpu(types.ModuleType):
    """``torch.cuda.random`` whose default generator is the CPU one."""

    def __init__(self) -> None:
        super().__init__("torch.cuda.random")
        self.get_rng_state = _cpu_get_rng_state
        self.set_rng_state = _cpu_set_rng_state
        self.manual_seed = lambda seed: torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda.random, name)


class _CudaAsCpu(types.ModuleType):
    """``torch.cuda`` as the CPU-compat proxy sees it (see the module docstring for each entry)."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")
        self.random = _CudaRandomAsCpu()
        self.current_device = lambda: torch.device("cpu")
        self.synchronize = lambda device=None: None
        self.get_rng_state = self.random.get_rng_state
        self.set_rng_state = self.random.set_rng_state
        self.manual_seed = self.random.manual_seed

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchAsCpu(types.ModuleType):
    """The ``torch`` a patched megatron module sees: CUDA requests become CPU ones, the rest is torch."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaAsCpu()
        self.autocast = _autocast
        for name in ("zeros", "empty", "ones", "full", "tensor", "arange"):
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def _tensor_cuda_stays_on_cpu() -> Iterator[None]:
    had_own = "cuda" in torch.Tensor.__dict__
    original = torch.Tensor.__dict__.get("cuda")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_own:
            torch.Tensor.cuda = original  # type: ignore[method-assign]
        else:
            del torch.Tensor.cuda


def _stay_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _tensor_cuda_stays_on_cpu():
            return fn(*args, **kwargs)

    wrapped.__ssa_cpu_compat__ = True  # type: ignore[attr-defined]
    return wrapped


class _DropRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _RNG_WARNING


def _patch(owner: Any, name: str, value: Any) -> None:
    _patched.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def is_cpu_compat_active() -> bool:
    """True while megatron's CUDA paths are redirected to CPU."""
    return bool(_patched)


def enable_cpu_compat() -> bool:
    """Redirect megatron-core's CUDA-only paths to CPU when CUDA is absent; return whether it is active.

    Does nothing (returns False) when ``torch.cuda.is_available()``. Calling it again is a no-op.
    """
    global _log_filter
    if torch.cuda.is_available():
        return False
    if _patched:
        return True
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version != SUPPORTED_MEGATRON_VERSION:
        raise RuntimeError(
            f"ssa_megatron.parallel.cpu_compat is written for megatron-core=={SUPPORTED_MEGATRON_VERSION}, "
            f"found "
            f"{version}; re-check its CUDA-only paths (see the module docstring) and update the entries, "
            "or install the pinned version (constraints/cpu.txt)."
        )
    proxy = _TorchAsCpu()
    for module_name in _PROXIED_MODULES:
        _patch(importlib.import_module(module_name), "torch", proxy)
    random_module = importlib.import_module("megatron.core.tensor_parallel.random")
    _patch(random_module, "_get_cuda_rng_state", _cpu_get_rng_state)
    _patch(random_module, "_set_cuda_rng_state", _cpu_set_rng_state)
    for module_name, attr in _TENSOR_CUDA_FUNCTIONS:
        module = importlib.import_module(module_name)
        _patch(module, attr, _stay_on_cpu(getattr(module, attr)))
    for module_name, cls_name, attr in _TENSOR_CUDA_METHODS:
        cls = getattr(importlib.import_module(module_name), cls_name)
        _patch(cls, attr, _stay_on_cpu(getattr(cls, attr)))
    _log_filter = _DropRngWarning()
    logging.getLogger(random_module.__name__).addFilter(_log_filter)
    return True


def disable_cpu_compat() -> None:
    """Undo ``enable_cpu_compat`` (restores every patched attribute); a no-op when inactive."""
    global _log_filter
    while _patched:
        owner, name, original = _patched.pop()
        setattr(owner, name, original)
    if _log_filter is not None:
        logging.getLogger("megatron.core.tensor_parallel.random").removeFilter(_log_filter)
        _log_filter = None


def compute_device() -> torch.device:
    """The device tensors of this process live on: the current CUDA device, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
