"""Runs inside each spawned gloo rank of tests/optimizers/test_distributed.py (importable for spawn)."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

from .helpers import groups, mlp


def fsdp2_refused(rank: int, world: int) -> dict:
    """FSDP2's DTensor parameters are refused when the optimizer is built, before any step."""
    from torch.distributed.fsdp import fully_shard

    from slimtrain.optimizers import GaLoreAdamW

    model = mlp()
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer)
    fully_shard(model)
    before = [p.to_local().clone() for p in model.parameters()]
    try:
        GaLoreAdamW(groups(model), lr=1e-2)
    except RuntimeError as e:
        message = str(e)
    else:
        message = None
    unchanged = all(torch.equal(p.to_local(), b) for p, b in zip(model.parameters(), before))
    return {"message": message, "unchanged": unchanged}


SCENARIOS = {"fsdp2_refused": fsdp2_refused}


def worker(rank: int, world: int, port: int, names: list[str], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        for name in names:
            queue.put((rank, name, SCENARIOS[name](rank, world)))
    except Exception:  # noqa: BLE001 - the parent reports it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
