"""Runs inside each spawned gloo rank of tests/optimizers/test_distributed.py (importable for spawn)."""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
import torch.distributed as dist

from .helpers import groups, mlp


STEPS = 8  # refreshes at steps 0 and 5 (helpers.groups: gap 5)


def batch(step: int, rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    x = torch.randn(16, 24, generator=g)
    return x, torch.sin(3 * x[:, :8])


def optimizer(model):
    from slimtrain.optimizers import FiraAdamW

    # Fira: projected matrices with its residual rule, and plain AdamW biases, all stepped in the hook.
    return FiraAdamW(groups(model), lr=1e-2, weight_decay=0.01)


def ddp_layerwise(rank: int, world: int, accum: int = 1, as_view: bool = False) -> list:
    """LayerwiseStepper on a DDP model with small buckets (several per backward)."""
    from torch.nn.parallel import DistributedDataParallel

    from slimtrain.optimizers import LayerwiseStepper

    model = mlp()
    # ~2 KB buckets: the MLP's 1.9K floats in several buckets.
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.002, gradient_as_bucket_view=as_view)
    opt = optimizer(model)
    stepper = LayerwiseStepper(opt, model=ddp)
    for step in range(STEPS):
        for micro in range(accum):
            x, y = batch(step, rank, micro)
            # DDP decides in forward whether this backward synchronizes: no_sync() wraps both.
            with ddp.no_sync() if micro < accum - 1 else contextlib.nullcontext():
                (((ddp(x) - y) ** 2).mean() / accum).backward()
        assert all(p.grad is None for p in model.parameters())
    stepper.remove()
    return [p.detach().numpy().copy() for p in model.parameters()]


def ddp_layerwise_accum(rank: int, world: int) -> list:
    """Two micro-batches, the first under no_sync(), with gradients kept as views of DDP's buckets."""
    return ddp_layerwise(rank, world, accum=2, as_view=True)


def ddp_layerwise_added_group(rank: int, world: int) -> dict:
    """A group added with add_param_group after the stepper was built (parameters DDP averages but the optimizer
    did not hold), against DDP with a regular step; then a parameter DDP does not average (frozen when DDP was
    built) given to the optimizer, which the stepper refuses at the end of the backward pass."""
    from torch.nn.parallel import DistributedDataParallel

    from slimtrain.optimizers import FiraAdamW, LayerwiseStepper

    models = []
    for layerwise in (True, False):
        model = mlp()
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.002)
        opt = FiraAdamW(groups(model[:3]), lr=1e-2, weight_decay=0.01)  # the last layer joins at step 4
        stepper = LayerwiseStepper(opt, model=ddp) if layerwise else None
        for step in range(STEPS):
            if step == 4:
                opt.add_param_group({"params": list(model[4].parameters())})
            x, y = batch(step, rank)
            ((ddp(x) - y) ** 2).mean().backward()
            if not layerwise:  # zero_grad after the step: the added parameters first step on all they accumulated
                opt.step()
                opt.zero_grad()
        if stepper is not None:
            stepper.remove()
        models.append(model)
    equal = all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models)))

    model = mlp()
    model[4].weight.requires_grad_(False)
    ddp = DistributedDataParallel(model)
    opt = FiraAdamW(groups(model[:3]), lr=1e-2)
    LayerwiseStepper(opt, model=ddp)
    model[4].weight.requires_grad_(True)
    opt.add_param_group({"params": [model[4].weight]})
    x, y = batch(0, rank)
    try:
        ((ddp(x) - y) ** 2).mean().backward()
    except RuntimeError as e:
        message = str(e)
    else:
        message = None
    return {"equal": equal, "unaveraged": message}


def layerwise_refusals(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from slimtrain.optimizers import LayerwiseStepper

    messages = {}
    model = mlp()
    for name, build in {
        "no_model": lambda: LayerwiseStepper(optimizer(model)),
        "not_ddp": lambda: LayerwiseStepper(optimizer(model), model=model),
        "accumulation": lambda: LayerwiseStepper(optimizer(model), 2, model=DistributedDataParallel(model)),
        "unused": lambda: LayerwiseStepper(
            optimizer(model), model=DistributedDataParallel(model, find_unused_parameters=True)),
    }.items():
        try:
            build()
        except RuntimeError as e:
            messages[name] = str(e)
        else:
            messages[name] = None
    return messages


SCENARIOS = {
    "ddp_layerwise": ddp_layerwise,
    "ddp_layerwise_accum": ddp_layerwise_accum,
    "layerwise_refusals": layerwise_refusals,
    "ddp_layerwise_added_group": ddp_layerwise_added_group,
}


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
