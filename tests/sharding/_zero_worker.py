"""Runs inside each of the spawned ranks of tests/sharding/test_zero.py (kept importable for spawn)."""

from __future__ import annotations

import os
import traceback

import torch
from torch import nn

STEPS = 12  # refreshes at steps 0, 5, 10: the run crosses two
MICRO = 4


def model() -> nn.Sequential:
    """Tall (24x16), wide (12x40) and square-ish matrices, plus biases; small enough that ZeRO cuts
    matrices mid-row on 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 12), nn.Tanh(),
                         nn.Linear(12, 4))


def batch(step: int, rank: int, micro: int = 0, same: bool = False):
    """Rank ``rank``'s micro-batch; with ``same``, every rank's is rank 0's."""
    g = torch.Generator().manual_seed(1000 * step + 10 * (0 if same else rank) + micro)
    x = torch.randn(MICRO, 16, generator=g)
    return x, torch.sin(2 * x[:, :4])


def optimizer(name: str, params_model: nn.Module):
    from slimtrain.optimizers import DCTAdamW, FiraAdamW, FrugalAdamW, GaLoreAdamW, low_rank_param_groups

    groups = low_rank_param_groups(params_model, ["0", "2", "4", "6"], rank=4, update_proj_gap=5, scale=0.5)
    return {
        "galore": lambda: GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01),
        "fira": lambda: FiraAdamW(groups, lr=1e-2),
        "frugal": lambda: FrugalAdamW(groups, lr=1e-2, density=0.25, projector="random"),
        # The default SVD projector; with the same batch on every rank, matrices whose gradient has rank <= the
        # subspace's (24 x 16 at rank 4, from 4 samples) have a residual of rounding noise at each refresh.
        "frugal-svd": lambda: FrugalAdamW(groups, lr=1e-2, density=0.25),
        "dct": lambda: DCTAdamW(groups, lr=1e-2),
        # 8-bit moments for the low-rank state of matrices whose moments reach 128 elements (40x4, 12x40
        # projected to 40x4); the small element-wise slices stay fp32, so both runs quantize the same tensors.
        "galore8bit": lambda: GaLoreAdamW(groups, lr=1e-2, state_bits=8, min_8bit_size=128),
        "dct8bit": lambda: DCTAdamW(groups, lr=1e-2, state_bits=8, min_8bit_size=128),
    }[name]()


def ds_config(stage: int, accum: int = 1, clip: float = 0.0, bf16: bool = False) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 64},
        "steps_per_print": 10_000,
    }


def train_distributed(engine, rank: int, steps: int, accum: int, start: int = 0, same: bool = False) -> None:
    for step in range(start, start + steps):
        for micro in range(accum):
            x, y = batch(step, rank, micro, same)
            loss = ((engine(x.to(next(engine.module.parameters()).dtype)).float() - y) ** 2).mean()
            engine.backward(loss)
            engine.step()


def full_params(engine) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    # numpy copies: tensors on a multiprocessing queue are shared-memory handles that die with the rank.
    return [safe_get_full_fp32_param(p).detach().numpy().copy() for p in engine.module.parameters()]


def worker(rank: int, world: int, port: int, cases: list[dict], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    try:
        import deepspeed
        import deepspeed.ops as dops

        # The shared-memory comm op serves inference all-reduce only; building it costs ~100 s of g++.
        dops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        from slimtrain import sharding

        for case in cases:
            net = model()
            opt = optimizer(case["optimizer"], net)
            config = ds_config(case["stage"], case.get("accum", 1), case.get("clip", 0.0), case.get("bf16", False))
            engine, zopt, _, _ = sharding.initialize(model=net, optimizer=opt, config=config)
            train_distributed(engine, rank, STEPS, case.get("accum", 1), same=case.get("same_batch", False))
            inner = engine.optimizer.optimizer if case["stage"] else None
            queue.put((rank, case["id"], full_params(engine), inner.state_bytes() if inner is not None else 0,
                       inner.comm.bytes_sent if inner is not None else 0))
    except Exception:  # report, then fail the rank
        queue.put((rank, "error", traceback.format_exc(), 0, 0))
        raise


def _setup(rank: int, world: int, port: int, timeout_s: int = 120) -> None:
    import datetime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import deepspeed
    import deepspeed.ops as dops

    dops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False, timeout=datetime.timedelta(seconds=timeout_s))


def _engine(name: str, stage: int, seed_shift: int = 0):
    from slimtrain import sharding

    net = model()
    if seed_shift:  # a different initialization: everything must then come from the checkpoint
        with torch.no_grad():
            for p in net.parameters():
                p.add_(seed_shift)
    engine, *_ = sharding.initialize(model=net, optimizer=optimizer(name, net), config=ds_config(stage))
    return engine


def worker_resume(rank: int, world: int, port: int, ckpt: str, runs: list[tuple[str, int]], queue) -> None:
    """For each (optimizer, stage): an uninterrupted run that saves at step 6, then a fresh engine
    resumed from that checkpoint."""
    try:
        _setup(rank, world, port)
        for name, stage in runs:
            where = os.path.join(ckpt, f"{name}-zero{stage}")
            engine = _engine(name, stage)
            train_distributed(engine, rank, 6, 1)
            engine.save_checkpoint(where, tag="step6")
            train_distributed(engine, rank, 6, 1, start=6)
            full = full_params(engine)
            resumed = _engine(name, stage, seed_shift=1)
            resumed.load_checkpoint(where, tag="step6")
            train_distributed(resumed, rank, 6, 1, start=6)
            queue.put((rank, f"{name}-zero{stage}", full, full_params(resumed)))
    except Exception:
        queue.put((rank, "error", traceback.format_exc(), None))
        raise


def worker_killed(rank: int, world: int, port: int, ckpt: str, queue) -> None:
    """GaLore at ZeRO-2, checkpoints every 4 steps; rank 1 is SIGKILLed in the middle of step 10."""
    import signal

    _setup(rank, world, port, timeout_s=30)
    engine = _engine("galore", 2)
    for step in range(STEPS):
        if step and step % 4 == 0:
            engine.save_checkpoint(ckpt, tag=f"step{step}")
        x, y = batch(step, rank)
        loss = ((engine(x) - y) ** 2).mean()
        if step == 10 and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        engine.backward(loss)
        engine.step()
    queue.put((rank, "finished"))  # never reached by a healthy test: rank 0 must fail at the lost peer


def worker_restart(rank: int, world: int, port: int, ckpt: str, queue) -> None:
    """Restart after the kill: load the newest checkpoint and finish the run."""
    try:
        _setup(rank, world, port)
        engine = _engine("galore", 2, seed_shift=1)
        with open(os.path.join(ckpt, "latest")) as f:  # the newest tag DeepSpeed finished writing
            tag = f.read().strip()
        path, _ = engine.load_checkpoint(ckpt, tag=tag)
        start = int(tag.removeprefix("step")) if path else -1
        train_distributed(engine, rank, STEPS - start, 1, start=start)
        queue.put((rank, start, full_params(engine)))
    except Exception:
        queue.put((rank, "error", traceback.format_exc()))
        raise


def worker_reshard(rank: int, world: int, port: int, ckpt: str, queue) -> None:
    """Load a 2-rank checkpoint with 1 rank: must be refused clearly."""
    try:
        _setup(rank, world, port)
        engine = _engine("fira", 2)
        engine.load_checkpoint(os.path.join(ckpt, "fira-zero2"), tag="step6")
        queue.put((rank, "loaded"))
    except Exception as e:  # the expected outcome
        queue.put((rank, f"{type(e).__name__}: {e}"))
