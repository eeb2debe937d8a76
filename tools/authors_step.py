"""Time the SSA authors' own 1B training step (zhenyi4/ssa) on one GPU, for comparison with ours.

    git clone https://github.com/zhenyi4/ssa third_party/ssa
    git clone https://github.com/fla-org/native-sparse-attention third_party/native-sparse-attention
    pip install --no-deps --target third_party/authors_site transformers==4.54.0 tokenizers==0.21.4 \
        huggingface-hub==0.34.4 liger-kernel==0.8.5 fla-core==0.6.0
    PYTHONPATH=third_party/authors_site python tools/authors_step.py --authors-repo third_party/ssa \
        --nsa-repo third_party/native-sparse-attention --seq-lengths 8192 32768

Their model (configs/ssa-1b-init: LlamaNSAForCausalLM, 16 layers, hidden 2048, 32/2 heads of 64,
vocab 128256, 16 blocks of 16) is assembled from the two checkouts in a temporary directory: their
configuration and modeling files as one package, and fla-org/native-sparse-attention's ``ops``
with their ``hf_files/parallel.py`` in place of its own (as their README instructs). Nothing of
theirs enters this repository. It imports liger_kernel, fla (fla-core) and einops, and was written
for transformers 4.54: on 5.x it imports but does not build (its rotary embedding looks up
``ROPE_INIT_FUNCTIONS["default"]``, which 5.x dropped). Where the installed transformers is 5.x,
put a 4.5x one first on PYTHONPATH for this process only (``tools/bench_train.py --authors-site``
does).

The model is built in bf16 on the GPU with random init and timed on synthetic tokens (batch 1),
with CUDA events (median after warm-up): their forward with the SSA alignment loss plus backward,
and the same followed by a fused AdamW step on the bf16 parameters. Attention runs on PyTorch SDPA
(``attn_implementation="sdpa"``), since flash_attn, which their training script names, is not
installed here. From ``--checkpoint-at`` on, their gradient checkpointing is on (as their
train_pt.sh runs it). Writes JSON (``--out``), or prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL_PACKAGE = "ssa_authors_model"
# A model small enough for a CPU run under TRITON_INTERPRET=1 (their kernels need 16 query heads
# per KV head); it proves the assembly, not a timing.
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "head_dim": 16,
        "num_attention_heads": 32, "num_key_value_heads": 2, "vocab_size": 512, "block_size": 16,
        "block_counts": 2}  # fmt: skip


class UsageError(ValueError):
    """Bad command-line input: reported as one line, exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Both checkouts are required; checked after parsing, so an unknown flag is named first.
    p.add_argument("--authors-repo", type=Path, help="checkout of github.com/zhenyi4/ssa (required)")
    p.add_argument("--nsa-repo", type=Path,
                   help="checkout of github.com/fla-org/native-sparse-attention (required)")  # fmt: skip
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--checkpoint-at", type=int, default=32768,
                   help="sequence length from which their gradient checkpointing is on")  # fmt: skip
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model (CPU check of the assembly)")
    p.add_argument("--out", type=Path, help="JSON path (default: print it)")
    args = p.parse_args(argv)
    if args.authors_repo is None or args.nsa_repo is None:
        p.error("pass both --authors-repo and --nsa-repo (checkouts of the two repositories)")
    if args.reps < 1 or args.warmup < 0 or min(args.seq_lengths) < 1:
        p.error("--reps and --seq-lengths must be >= 1, --warmup >= 0")
    from ssa_megatron.benchmarking import authors_checkout_problem

    problem = authors_checkout_problem(args.authors_repo, args.nsa_repo)
    if problem:
        raise UsageError(problem)
    args.authors_repo, args.nsa_repo = args.authors_repo.resolve(), args.nsa_repo.resolve()
    return args


def assemble(authors: Path, nsa: Path, into: Path) -> None:
    """Their model package and the NSA package with their ``parallel.py``, as links under ``into``.

    The NSA package's own ``__init__`` (which imports its model classes and fla's layers) is
    replaced by an empty one: their model needs only ``native_sparse_attention.ops.parallel``.
    """
    from ssa_megatron.benchmarking import AUTHORS_MODEL_DIR

    ops = into / "native_sparse_attention" / "ops"
    ops.mkdir(parents=True)
    (into / "native_sparse_attention" / "__init__.py").write_text("")
    (ops / "__init__.py").write_text("")
    (ops / "utils.py").symlink_to(nsa / "native_sparse_attention" / "ops" / "utils.py")
    (ops / "parallel.py").symlink_to(authors / "hf_files" / "parallel.py")
    model = into / MODEL_PACKAGE
    model.mkdir()
    (model / "__init__.py").write_text("")
    for name in ("configuration_llama_nsa.py", "modeling_llama_nsa.py"):
        (model / name).symlink_to(authors / AUTHORS_MODEL_DIR / name)


def provenance(repo: Path, files: tuple[Path, ...]) -> dict[str, Any]:
    """The checkout's git commit (None for an export without its own .git) and the sha256 of each
    file used, which name the code timed either way."""
    commit = None
    if (repo / ".git").exists():
        proc = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = proc.stdout.strip() if proc.returncode == 0 else None
    hashes = {str(f): hashlib.sha256((repo / f).read_bytes()).hexdigest() for f in files}
    return {"commit": commit, "sha256": hashes}


def build_model(args: argparse.Namespace, device: Any) -> Any:
    import importlib

    import torch

    from ssa_megatron.benchmarking import AUTHORS_MODEL_DIR

    config_mod = importlib.import_module(f"{MODEL_PACKAGE}.configuration_llama_nsa")
    modeling = importlib.import_module(f"{MODEL_PACKAGE}.modeling_llama_nsa")
    config = config_mod.LlamaNSAConfig.from_pretrained(str(args.authors_repo / AUTHORS_MODEL_DIR))
    if args.tiny:
        for key, value in TINY.items():
            setattr(config, key, value)
    config.use_cache = False
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = modeling.LlamaNSAForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=dtype)
    return model.to(device).train()


def time_step(model: Any, seq: int, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    from ssa_megatron.benchmarking import interleaved_cuda_times_ms

    checkpointing = seq >= args.checkpoint_at
    if checkpointing:
        # What their train_pt.py does under --gradient_checkpointing True.
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    gen = torch.Generator().manual_seed(seq)
    tokens = torch.randint(0, model.config.vocab_size, (1, seq), generator=gen).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")  # fmt: skip

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        # Their forward prints both losses each step (reading them on the host, which stays in the
        # timing); the text is dropped.
        with contextlib.redirect_stdout(io.StringIO()):
            loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()

    def step() -> None:
        fwd_bwd()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    samples = interleaved_cuda_times_ms({"fwd_bwd": fwd_bwd, "step": step}, args.reps, args.warmup)
    fwd_bwd_ms, step_ms = statistics.median(samples["fwd_bwd"]), statistics.median(samples["step"])
    row = {
        "seq_length": seq,
        "micro_batch": 1,
        "gradient_checkpointing": checkpointing,
        "fwd_bwd_ms": fwd_bwd_ms,
        "step_ms": step_ms,
        "fwd_bwd_tokens_per_s": seq / (fwd_bwd_ms * 1e-3),
        "step_tokens_per_s": seq / (step_ms * 1e-3),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
        "fwd_bwd_ms_samples": samples["fwd_bwd"],
        "step_ms_samples": samples["step"],
    }
    model.zero_grad(set_to_none=True)
    return row


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("torch", "triton", "transformers", "fla-core", "liger-kernel", "einops"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ssa_megatron.benchmarking import AUTHORS_FILES, NSA_FILES, environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    random.seed(0)  # their forward draws the main branch with random.random()
    with tempfile.TemporaryDirectory() as tmp:
        assemble(args.authors_repo, args.nsa_repo, Path(tmp))
        sys.path.insert(0, tmp)
        model = build_model(args, device)
        rows = [time_step(model, seq, args, device) for seq in args.seq_lengths]
    return {
        **environment(),
        "what": "SSA authors' LlamaNSAForCausalLM training step (zhenyi4/ssa configs/ssa-1b-init), batch 1",
        "authors_code": provenance(args.authors_repo, AUTHORS_FILES),
        "nsa_code": provenance(args.nsa_repo, NSA_FILES),
        "model": "tiny (CPU check)" if args.tiny else "ssa-1b-init",
        "parameters": sum(p.numel() for p in model.parameters()),
        "attn_implementation": "sdpa (flash_attn, which their training uses, is not installed here)",
        "precision": "bf16 parameters and activations" if device.type == "cuda" else "fp32 (CPU check)",
        "optimizer": "torch AdamW (fused) on the bf16 parameters after clipping at 1.0: no fp32 master "
        "copy, so lighter than their DeepSpeed bf16 step",
        "versions": versions(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(f"authors_step: {exc}", file=sys.stderr)
        return 2
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        print(f"authors_step: their model needs transformers 4.x, found {transformers.__version__}; put a "
              "4.5x first on PYTHONPATH (bench_train.py --authors-site FOLDER)", file=sys.stderr)
        return 1
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
