"""Layer-wise stepping equals the standard loop (``loss.backward()`` k times, then ``opt.step()`` and
``opt.zero_grad()``) bit for bit on CPU when the model changes while it trains: branches that run in some backward
passes only (conditional layers, MoE experts), parameters unfrozen after the stepper was built, and parameter
groups added with ``add_param_group``. Both runs do the same operations in the same order on each parameter, so
their weights are equal, not close."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slimtrain.optimizers import GaLoreAdamW, LayerwiseStepper, low_rank_param_groups


class Branches(nn.Module):
    """A trunk and three branches; each backward pass uses the branches its schedule names."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(24, 40)
        self.branches = nn.ModuleList(nn.Linear(40, 8) for _ in range(3))

    def forward(self, x: torch.Tensor, used: tuple[int, ...]) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return sum(self.branches[i](h) for i in used)


def _loss(model: Branches, i: int, used: tuple[int, ...], k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(16, 24, generator=g)
    return ((model(x, used) - torch.sin(3 * x[:, :8])) ** 2).mean() / k


def _optimizer(model: Branches) -> GaLoreAdamW:
    """Projected weights and plain biases of the parameters that require grad now."""
    return GaLoreAdamW(low_rank_param_groups(model, ["trunk", "branches"], rank=4, update_proj_gap=3), lr=1e-2)


def _train(layerwise: bool, schedule: list[tuple[int, ...]], k: int, setup=None, change=None, when: int = -1):
    """Train on ``schedule`` layer-wise or with the standard loop. ``setup(model)`` returns the optimizer (default:
    :func:`_optimizer`); ``change(model, opt)`` runs before backward pass ``when``."""
    model = Branches()
    opt = (setup or _optimizer)(model)
    stepper = LayerwiseStepper(opt, accumulation_steps=k) if layerwise else None
    for i, used in enumerate(schedule):
        if i == when:
            change(model, opt)
        _loss(model, i, used, k).backward()
        if (i + 1) % k == 0:
            if layerwise:  # every gradient of the window was stepped on and freed
                assert all(p.grad is None for p in model.parameters())
            else:
                opt.step()
                opt.zero_grad()
    if stepper is not None:
        stepper.remove()
    return model


def _assert_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), f"{name}: max difference {(p - q).abs().max().item():.3g}"


def _both(*args, **kwargs) -> Branches:
    layerwise = _train(True, *args, **kwargs)
    _assert_equal(layerwise, _train(False, *args, **kwargs))
    return layerwise


# Branch 0 runs in every pass; branch 1 only in the first pass of each window (so never in a window's last pass:
# it is stepped when that pass ends); branch 2 in a few last passes only.
SCHEDULES = {
    2: [(0, 1), (0,), (0, 1), (0, 2), (0,), (0,), (0, 1), (0, 2)],
    3: [(0, 1), (0,), (0, 2), (0, 1), (0,), (0,), (0, 1, 2), (0,), (0,)],
}


@pytest.mark.parametrize("k", sorted(SCHEDULES))
def test_accumulation_counts_backward_passes_not_gradient_arrivals(k):
    _both(SCHEDULES[k], k)


def _frozen_branch_2(model):
    opt = _optimizer(model)  # built while everything trains: branch 2 is in its groups
    model.branches[2].requires_grad_(False)  # frozen when the stepper is built
    return opt


def _unfreeze_branch_2(model, opt):
    model.branches[2].requires_grad_(True)


@pytest.mark.parametrize("k,when", [(1, 3), (2, 3), (2, 4)])  # mid-window (3) and at a window's start (4)
def test_a_parameter_unfrozen_after_the_stepper_was_built_trains(k, when):
    model = _both([(0, 2)] * 8, k, setup=_frozen_branch_2, change=_unfreeze_branch_2, when=when)
    assert not torch.equal(model.branches[2].weight, Branches().branches[2].weight)


def _without_branch_2(model):
    model.branches[2].requires_grad_(False)
    opt = _optimizer(model)  # frozen: not in the groups
    assert all(p is not model.branches[2].weight for g in opt.param_groups for p in g["params"])
    return opt


@pytest.mark.parametrize("projected", [False, True])
def test_a_group_added_with_add_param_group_trains(projected):
    def add_branch_2(model, opt):
        model.branches[2].requires_grad_(True)
        extra = {"rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"} if projected else {}
        opt.add_param_group({"params": [model.branches[2].weight], **extra})
        opt.add_param_group({"params": [model.branches[2].bias]})

    model = _both([(0, 2)] * 8, 2, setup=_without_branch_2, change=add_branch_2, when=3)
    assert not torch.equal(model.branches[2].weight, Branches().branches[2].weight)


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("out of memory (simulated)")


def test_a_backward_pass_that_raised_is_over():
    """Pass 2 (the first of its window) raises halfway, after the branches' gradients arrived and before the
    trunk's; the loop goes on. The stepper must take pass 3 for a new pass, the window's last, as the standard
    loop counts it, and not for the rest of pass 2 (the engine never ends a pass that raised)."""
    schedule, k = [(0, 1)] * 6, 2
    runs = []
    for layerwise in (True, False):
        model = Branches()
        opt = _optimizer(model)
        stepper = LayerwiseStepper(opt, accumulation_steps=k) if layerwise else None
        for i, used in enumerate(schedule):
            x = torch.randn(16, 24, generator=torch.Generator().manual_seed(i))
            h = torch.tanh(model.trunk(x))
            h = _RaiseInBackward.apply(h) if i == 2 else h
            loss = ((sum(model.branches[j](h) for j in used) - torch.sin(3 * x[:, :8])) ** 2).mean() / k
            try:
                loss.backward()
            except RuntimeError:
                assert i == 2 and model.branches[0].weight.grad is not None and model.trunk.weight.grad is None
            if not layerwise and (i + 1) % k == 0:
                opt.step()
                opt.zero_grad()
        if stepper is not None:
            stepper.remove()
        runs.append(model)
    _assert_equal(*runs)


def test_nothing_trainable_is_refused():
    model = Branches()
    opt = _optimizer(model)
    model.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"none of the optimizer's 8 parameters requiring grad.*unfreeze"):
        LayerwiseStepper(opt)


class Checkpointed(Branches):
    """:class:`Branches` with its branches under activation checkpointing: their gradients arrive in the backward
    pass the checkpoint runs inside the outer one when ``use_reentrant`` is True."""

    use_reentrant = True

    def forward(self, x: torch.Tensor, used: tuple[int, ...]) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return sum(checkpoint(self.branches[i], h, use_reentrant=self.use_reentrant) for i in used)


def _train_checkpointed(layerwise: bool, k: int, reentrant: bool) -> Branches:
    Checkpointed.use_reentrant = reentrant
    model = Checkpointed()
    opt = _optimizer(model)
    stepper = LayerwiseStepper(opt, accumulation_steps=k) if layerwise else None
    for i, used in enumerate(SCHEDULES[2][:4]):
        _loss(model, i, used, k).backward()
        if not layerwise and (i + 1) % k == 0:
            opt.step()
            opt.zero_grad()
    if stepper is not None:
        stepper.remove()
    return model


@pytest.mark.parametrize("k, reentrant", [(1, True), (2, False)])
def test_activation_checkpointing_steps_as_the_standard_loop(k, reentrant):
    _assert_equal(_train_checkpointed(True, k, reentrant), _train_checkpointed(False, k, reentrant))


def test_accumulation_under_a_reentrant_checkpoint_is_refused():
    # The branches' gradients, the first of each backward pass, arrive inside the checkpoint's own backward pass:
    # the stepper cannot tell where the outer pass ends, so it refuses rather than count passes wrongly.
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        _train_checkpointed(True, 2, True)
