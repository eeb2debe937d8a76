"""The megatron engine's AdamW runs torch's fused kernel, also after a checkpoint load, and resumes exactly.

Engine-level runs reuse the tiny real SSA model and random batches of test_training_checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_training_checkpoint import _cfg, _params, _random_batch

FUSED_KERNEL = "aten::_fused_adamw_"


def _fused_state(engine) -> dict:
    """Flags of every torch param group and the shape of the per-param `step` state."""
    from ssa_megatron.training.optim import torch_adam_optimizers

    inner = torch_adam_optimizers(engine.optimizer)
    flags = {(g["fused"], g["foreach"]) for o in inner for g in o.param_groups}
    # state.get: indexing the defaultdict would add empty entries to the optimizer.
    steps = [
        (p, o.state[p]["step"]) for o in inner for g in o.param_groups for p in g["params"] if o.state.get(p)
    ]
    return {
        "optimizers": len(inner),
        "flags": flags,
        "step_values": {float(s) for _, s in steps},
        "step_on_param_device_fp32": all(s.dtype == torch.float32 and s.device == p.device for p, s in steps),
        "distinct_step_tensors": len({id(s) for _, s in steps}) == len(steps) > 0,
    }


def _steps(engine, batches: list[dict], first: int) -> set[str]:
    """Train on `batches` from iteration `first`; returns the names of the ops that ran."""
    from ssa_megatron.training.loop import train_step

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i, batch in enumerate(batches):
            train_step(engine, first + i, [batch])
            engine.scheduler.step(1)
    return {e.name for e in prof.events()}


def _save(engine, root: str, iteration: int) -> None:
    from ssa_megatron.training import checkpoint as ckpt

    cfg = _cfg(seed=1)
    ckpt.save_checkpoint(
        root, iteration, engine.model, engine.optimizer, engine.scheduler, {}, cfg.to_dict(), cfg.to_yaml()
    )


def _engine_cfg(device: str):
    cfg = _cfg(seed=1)
    if device == "cuda":
        # The GPU default: bf16 with megatron's distributed optimizer (fp32 master weights).
        cfg.train.device, cfg.train.precision, cfg.parallel.distributed_optimizer = "cuda", "bf16", True
    return cfg


def _load_fresh(root: str, device: str = "cpu"):
    from ssa_megatron.training import checkpoint as ckpt
    from ssa_megatron.training.runner import build_engine

    engine = build_engine(_engine_cfg(device), 128, torch.device(device))
    ckpt.load_checkpoint(
        ckpt.resolve_checkpoint("auto", root), engine.model, engine.optimizer, engine.scheduler
    )
    return engine


def _resume(rank: int, world: int, root: str, device: str = "cpu", port: int = 0) -> dict:
    from ssa_megatron.parallel.state import destroy_parallel
    from ssa_megatron.training.runner import build_engine

    if device == "cuda":
        # The harness's gloo group cannot run the distributed optimizer's collectives on CUDA tensors.
        torch.distributed.destroy_process_group()
        torch.cuda.set_device(rank)
        torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)  # fmt: skip
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(3)
    batches = [_random_batch(gen) for _ in range(4)]
    full = build_engine(_engine_cfg(device), 128, torch.device(device))
    built = _fused_state(full)
    ops = _steps(full, batches[:2], 1)
    after_steps = _fused_state(full)
    _save(full, root, 2)
    _steps(full, batches[2:], 3)
    expected = _params(full)
    destroy_parallel()

    resumed = _load_fresh(root, device)
    loaded = _fused_state(resumed)
    resumed_ops = _steps(resumed, batches[2:], 3)
    got = _params(resumed)
    result = {
        "built": built,
        "fused_kernel_ran": FUSED_KERNEL in ops,
        "after_steps": after_steps,
        "loaded": loaded,
        "fused_kernel_ran_after_load": FUSED_KERNEL in resumed_ops,
        "bitwise": got.keys() == expected.keys() and all(torch.equal(v, got[k]) for k, v in expected.items()),
    }
    destroy_parallel()
    return result


def _from_unfused_checkpoint(rank: int, world: int, root: str) -> dict:
    """A checkpoint written by megatron's default torch AdamW (fused and foreach left unset)."""
    from ssa_megatron.parallel.state import destroy_parallel
    from ssa_megatron.training.optim import torch_adam_optimizers
    from ssa_megatron.training.runner import build_engine

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(5)
    old = build_engine(_cfg(seed=1), 128, torch.device("cpu"))
    for o in torch_adam_optimizers(old.optimizer):
        for group in [o.defaults, *o.param_groups]:
            group["fused"] = group["foreach"] = None
    ops = _steps(old, [_random_batch(gen)], 1)
    _save(old, root, 1)
    destroy_parallel()

    resumed = _load_fresh(root)
    loaded = _fused_state(resumed)
    resumed_ops = _steps(resumed, [_random_batch(gen)], 2)
    result = {
        "old_ran_fused": FUSED_KERNEL in ops,
        "loaded": loaded,
        "fused_kernel_ran_after_load": FUSED_KERNEL in resumed_ops,
    }
    destroy_parallel()
    return result


def test_fused_adamw_resumes_bit_exactly(tmp_path: Path) -> None:
    (r,) = run_distributed(_resume, world_size=1, args=(str(tmp_path / "ckpt"),))
    # Megatron groups the params by weight decay into a ChainedOptimizer of torch AdamWs.
    assert r["built"]["optimizers"] >= 1 and r["built"]["flags"] == {(True, False)}
    # The state exists before the first step (megatron's distributed optimizer reads the step from it
    # when a checkpoint is loaded into a fresh optimizer).
    assert r["built"]["step_values"] == {0.0} and r["built"]["step_on_param_device_fp32"]
    assert r["built"]["distinct_step_tensors"]
    assert r["fused_kernel_ran"]
    assert r["after_steps"]["step_values"] == {2.0}
    assert r["after_steps"]["step_on_param_device_fp32"] and r["after_steps"]["distinct_step_tensors"]
    # Loading replaces the param groups with the saved ones; they must still select the fused kernel.
    assert r["loaded"]["flags"] == {(True, False)} and r["loaded"]["step_values"] == {2.0}
    assert r["loaded"]["step_on_param_device_fp32"] and r["loaded"]["distinct_step_tensors"]
    assert r["fused_kernel_ran_after_load"]
    assert r["bitwise"]


@pytest.mark.gpu
def test_gpu_distributed_optimizer_resumes_bit_exactly(tmp_path: Path) -> None:
    # bf16 + megatron's DistributedOptimizer (the GPU default), whose load path reads the step from
    # the torch state; the profiler's CPU activity still records the fused op's dispatch.
    from tests.distributed import free_port

    (r,) = run_distributed(_resume, world_size=1, args=(str(tmp_path / "ckpt"), "cuda", free_port()))
    assert r["built"]["flags"] == {(True, False)} and r["loaded"]["flags"] == {(True, False)}
    assert r["loaded"]["step_values"] == {2.0} and r["loaded"]["step_on_param_device_fp32"]
    assert r["fused_kernel_ran"] and r["fused_kernel_ran_after_load"]
    assert r["bitwise"]


def test_checkpoint_of_unfused_optimizer_loads_fused(tmp_path: Path) -> None:
    (r,) = run_distributed(_from_unfused_checkpoint, world_size=1, args=(str(tmp_path / "ckpt"),))
    assert not r["old_ran_fused"], "the old-style optimizer must really have run another kernel"
    assert r["loaded"]["flags"] == {(True, False)} and r["loaded"]["step_values"] == {1.0}
    assert r["loaded"]["step_on_param_device_fp32"] and r["loaded"]["distinct_step_tensors"]
    assert r["fused_kernel_ran_after_load"]


def _adamw(params: list[torch.Tensor]) -> torch.optim.AdamW:
    from ssa_megatron.training.optim import use_fused_adam

    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    use_fused_adam(opt)
    return opt


def _train(opt: torch.optim.AdamW, grads: list[list[torch.Tensor]]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()


def test_shared_step_tensor_from_distributed_optimizer_load_is_split() -> None:
    """Megatron's DistributedOptimizer.load_state_dict (torch-optimizer fallback) gives every param
    the *same* CPU step tensor; the fused kernel increments all steps in one call, so a shared
    tensor would advance once per param and skew the bias correction."""
    gen = torch.Generator().manual_seed(11)
    init = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(3)]

    reference = _adamw([p.clone() for p in init])
    _train(reference, grads)

    first = _adamw([p.clone() for p in init])
    _train(first, grads[:2])
    saved = first.state_dict()
    shared = torch.tensor(2.0)
    for s in saved["state"].values():
        s["step"] = shared
    resumed = _adamw([p.detach().clone() for g in first.param_groups for p in g["params"]])
    resumed.load_state_dict(saved)
    _train(resumed, grads[2:])

    got = [p for g in resumed.param_groups for p in g["params"]]
    want = [p for g in reference.param_groups for p in g["params"]]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert {float(resumed.state[p]["step"]) for p in got} == {3.0}


def test_adam_steps_come_back_from_the_saved_param_groups() -> None:
    """The distributed optimizer's load leaves the fresh optimizer's step in the torch state; the step
    saved in its param groups (one dict per chained part) must win."""
    from types import SimpleNamespace

    from ssa_megatron.training.optim import restore_adam_steps

    init = [torch.randn(4, 3), torch.randn(5)]
    opt = _adamw([p.clone() for p in init])
    _train(opt, [[torch.randn_like(p) for p in init]])
    megatron_like = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=opt)])
    loaded = {
        0: {"optimizer": {"param_groups": [{"step": 7, "lr": 0.1}]}},
        1: {"optimizer": {"param_groups": []}},
    }
    restore_adam_steps(megatron_like, loaded)
    steps = [opt.state[p]["step"] for g in opt.param_groups for p in g["params"]]
    assert {float(s) for s in steps} == {7.0} and len({id(s) for s in steps}) == len(steps)
    assert all(s.dtype == torch.float32 for s in steps)
    # A non-distributed optimizer saves no step in its param groups: its loaded state stands.
    restore_adam_steps(megatron_like, {"optimizer": {"param_groups": [{"lr": 0.1}]}})
    assert {float(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]} == {7.0}
    with pytest.raises(RuntimeError, match="disagree on the Adam step"):
        restore_adam_steps(
            megatron_like, {0: {"param_groups": [{"step": 2}]}, 1: {"param_groups": [{"step": 3}]}}
        )


def _grads(device: str) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(3)
    shapes = [(37, 5), (128,), (3, 4, 5), (1,)]
    grads = [torch.randn(s, generator=gen, device=device) * (i + 1) for i, s in enumerate(shapes)]
    return [*grads, torch.randn(64, generator=gen, device=device).bfloat16()]


def test_grad_norm_replacement_matches_the_definition() -> None:
    from megatron.core.optimizer import clip_grads

    from ssa_megatron.training.optim import grad_l2_norm, use_sync_free_grad_norm

    grads = _grads("cpu")
    norm, _ = grad_l2_norm(2048 * 32, torch.zeros(1, dtype=torch.int), [grads[:2], grads[2:]], False)
    want = torch.cat([g.double().flatten() for g in grads]).norm()
    assert norm.shape == (1,) and norm.dtype == torch.float32
    assert abs(norm.item() - want.item()) < 1e-5 * want.item()
    _, each = grad_l2_norm(2048 * 32, torch.zeros(1, dtype=torch.int), [grads[:2], grads[2:]], True)
    torch.testing.assert_close(each, torch.stack([g.double().norm() for g in grads]).float())
    use_sync_free_grad_norm()
    assert clip_grads.l2_norm_impl is grad_l2_norm


@pytest.mark.gpu
def test_gpu_grad_norm_does_not_wait_for_the_gpu() -> None:
    from megatron.core.optimizer import clip_grads

    from ssa_megatron.training.optim import grad_l2_norm, use_sync_free_grad_norm

    grads = _grads("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm, _ = grad_l2_norm(2048 * 32, torch.zeros(1, dtype=torch.int, device="cuda"), [grads], False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = torch.cat([g.double().flatten() for g in grads]).norm()
    assert norm.device.type == "cuda" and abs(norm.item() - want.item()) < 1e-5 * want.item()
    # Through megatron's own entry point, as its optimizer calls it (one process group of one rank).
    use_sync_free_grad_norm()
    torch.distributed.init_process_group("nccl", init_method="tcp://127.0.0.1:29531", world_size=1, rank=0)
    try:
        assert abs(clip_grads.get_grad_norm_fp32(grads) - want.item()) < 1e-5 * want.item()
    finally:
        torch.distributed.destroy_process_group()
