"""Shared helpers of the tests that run the project's entry points: tools/*.py as subprocesses and the
``--section.key value`` override lists that pretrain_ssa.py takes."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# The tiny model of the CPU training tests: 2 layers, hidden 64, 2 selected blocks of 16 tokens.
TINY_MODEL: dict[str, str] = {
    "model.num_layers": "2",
    "model.hidden_size": "64",
    "model.ffn_hidden_size": "192",
    "model.num_attention_heads": "4",
    "model.num_query_groups": "2",
    "model.block_size": "16",
    "model.block_count": "2",
}

# fp32 on the CPU, where a distributed optimizer has nothing to shard.
CPU_FP32: dict[str, str] = {
    "train.precision": "fp32",
    "train.device": "cpu",
    "parallel.distributed_optimizer": "false",
}

# The schedule of the tiny loss-curve runs: batches of 2 x 2, a fixed seed, a short warm-up.
TINY_SCHEDULE: dict[str, str] = {
    "train.micro_batch_size": "2",
    "train.global_batch_size": "4",
    "train.seed": "1234",
    "optim.lr": "5e-3",
    "optim.min_lr": "5e-4",
    "optim.warmup_iters": "2",
}

# A run that logs every iteration as a line, has no periodic evaluation, starts fresh and writes nothing
# (runs from examples/tiny_cpu.yaml must not write into the repository's runs/ directory).
NO_OUTPUT_RUN: dict[str, str] = {
    "eval.interval": "0",
    "logging.interval": "1",
    "logging.progress": "lines",
    "checkpoint.load": "none",
    "checkpoint.dir": "null",
    "logging.tensorboard_dir": "null",
}


def default_and_slow(cases: Iterable[str], default: Collection[str]) -> list:
    """Parametrize values of a matrix of cases of one kind: the ``default`` ones represent the kind in
    the default run, the others carry the ``slow`` marker (all of them: ``pytest -m "slow or not slow"``)."""
    cases = list(cases)
    if unknown := set(default) - set(cases):
        raise ValueError(f"default cases {sorted(unknown)} are not among {cases}")
    return [case if case in default else pytest.param(case, marks=pytest.mark.slow) for case in cases]


def flags(pairs: Mapping[str, object]) -> list[str]:
    """``{"model.num_layers": 2}`` as ``["--model.num_layers", "2"]``, in the mapping's order."""
    return [x for key, value in pairs.items() for x in ("--" + key, str(value))]


# A prefill kernel_profile's top kernels as an H100 run names them: cuDNN dense attention, the three
# selection kernels, the sparse attention kernel, a GEMM and an elementwise op (those two non-attention).
PREFILL_KERNELS: list[dict[str, object]] = [
    {"name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "ms": 10.0},
    {"name": "_select_lse_kernel", "ms": 1.0},
    {"name": "_select_topk_kernel", "ms": 2.0},
    {"name": "_block_keys_kernel", "ms": 0.25},
    {"name": "_fwd_kernel", "ms": 1.5},
    {"name": "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", "ms": 40.0},
    {"name": "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", "ms": 5.0},
]


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """tools/<name>.py with `args`, run from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{name}.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_packed_split(out: Path) -> list[np.ndarray]:
    """Four seeded documents (ids 4..89) packed into 8-token MDS rows at `out`; returns the documents."""
    from streaming import MDSWriter

    from ssa_megatron.data import packing

    rng = np.random.default_rng(0)
    docs = [rng.integers(4, 90, size=n) for n in (7, 30, 3, 19)]
    with MDSWriter(out=str(out), columns=packing.mds_columns(97)) as writer:
        for row in packing.pack_documents(docs, 8, 3, np.dtype(np.uint16)):
            writer.write(
                {
                    packing.COL_TOKENS: row.tokens,
                    packing.COL_DOC_STARTS: row.doc_starts,
                    packing.COL_NUM_TOKENS: row.num_tokens,
                    packing.COL_ROW_ID: row.row_id,
                }
            )
    return docs
