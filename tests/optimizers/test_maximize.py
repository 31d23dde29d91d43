"""``maximize=True`` ascends: torch's AdamW(maximize=True) without projection, the descent on ``-grad``
with it."""

import pytest
import torch

from slimtrain.optimizers import DCTAdamW, FiraAdamW, FrugalAdamW, GaLoreAdamW, SSTAdamW

from .helpers import CONFIGS, batches, groups, mlp


def _run(model, opt, steps: int, sign: float) -> None:
    for x, y in batches(steps):
        opt.zero_grad()
        (sign * ((model(x) - y) ** 2).mean()).backward()
        opt.step()


@pytest.mark.parametrize("cls", [GaLoreAdamW, FiraAdamW, FrugalAdamW, DCTAdamW, SSTAdamW])
def test_unprojected_maximize_matches_torch_adamw(cls):
    # eps=1e-12 for the reason given in test_parity.py::test_default_weight_decay_is_torch_placement.
    a, b = mlp(), mlp()
    ref = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-12, maximize=True)
    ours = cls(b.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-12, maximize=True)
    _run(a, ref, 20, 1.0)
    _run(b, ours, 20, 1.0)
    moved = 0.0
    for p, q, r in zip(a.parameters(), b.parameters(), mlp().parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((q - r).detach().abs().max()))
    assert moved > 0.1  # 20 steps of lr 1e-2: far more than the tolerance


@pytest.mark.parametrize("factory", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_maximize_is_descent_on_negated_gradient(factory):
    """Every projector, residual rule, mode and 8-bit form: ascending on L equals descending on -L,
    bit for bit (negation is exact in every backward op and in every update rule)."""
    a, b = mlp(), mlp()
    opt_a = factory([{**g, "maximize": True} for g in groups(a)])
    opt_b = factory(groups(b))
    _run(a, opt_a, 12, 1.0)
    _run(b, opt_b, 12, -1.0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # and it is not the minimizing run
    c = mlp()
    _run(c, factory(groups(c)), 12, 1.0)
    assert not torch.equal(a[0].weight, c[0].weight)
