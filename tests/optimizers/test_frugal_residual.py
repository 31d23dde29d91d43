"""FRUGAL's residual threshold: a residual that is rounding noise takes no signSGD step.

When a gradient has nothing outside FRUGAL's subspace (its rank is at most the subspace's: small batches, small
matrices), the computed residual ``G - (G B^T) B`` is rounding noise, and ``sign`` of it would step every coordinate
by the full lr in the noise's direction. ``residual_noise_bound`` bounds that noise; a residual under it is dropped.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimtrain import kernels
from slimtrain.optimizers import FrugalAdamW, FrugalAdamW8bit, GaLoreAdamW, LayerwiseStepper
from slimtrain.optimizers.frugal import projection_noise_bound, residual_noise_bound
from slimtrain.optimizers.projectors import DCTProjector, RandomizedProjector, SVDProjector

from .._device import DEVICE, needs_triton
from .test_torch_contract import problem, run

BF16_ROUNDOFF = torch.finfo(torch.bfloat16).eps / 2


@pytest.mark.parametrize("name, projector", [("svd", SVDProjector()), ("svd-bf16", SVDProjector(basis_dtype="bf16")),
                                             ("randomized", RandomizedProjector()), ("dct", DCTProjector())])
def test_noise_of_an_in_subspace_gradient_is_under_the_bound(name, projector):
    """The bound is a worst case: for gradients of rank at most r (the SVD and randomized bases computed from them,
    as at a refresh; for DCT, a gradient built in the span of its rows), of every orientation, scale and size up
    to 256 x 128, the computed residual stays under it. Measured on this machine: at most 0.42 of it."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for m, n, r in [(10, 5, 1), (5, 10, 1), (40, 24, 6), (16, 40, 4), (24, 16, 4), (64, 64, 16), (256, 128, 32)]:
        for trial in range(4):
            k = int(torch.randint(1, r + 1, (), generator=gen))
            scale = 10.0 ** float(torch.randint(-8, 4, (), generator=gen))
            grad = torch.randn(m, k, generator=gen) @ torch.randn(k, n, generator=gen) * scale
            grad_t = grad if m >= n else grad.T  # the oriented frame: the projected side last
            state = {}
            projector.init_state(state, seed=trial)
            projector.refresh(grad_t, state, r, transposed=m < n)
            basis = projector.basis(state, grad_t.shape[1], grad_t.device)
            if name == "dct":
                grad_t = torch.randn(grad_t.shape[0], r, generator=gen) @ basis * scale
            residual = grad_t - (grad_t @ basis.T) @ basis
            bound = residual_noise_bound(grad_t.shape[1], r, BF16_ROUNDOFF if name == "svd-bf16" else 0.0)
            worst = max(worst, float(residual.norm() / grad_t.norm()) / bound)
    assert 0 < worst < 1, worst


def test_bound_values():
    """Their sizes, as the docstrings and docs/optimizers.md quote them: 23 u for FRUGAL on torch's 10 x 5 problem
    (rank 1), 2.6e-2 at n' = 4096, r = 1024; 5e-4 for a direction at n' = 4096; with TF32 matmuls the operands'
    rounding to 10 bits dominates (2 u_tf32 per dot product)."""
    u, u_tf32 = 2.0**-24, 2.0**-11
    assert residual_noise_bound(5, 1) == pytest.approx(23 * u, rel=1e-6)
    assert residual_noise_bound(4096, 1024) == pytest.approx(2.6e-2, rel=0.02)
    assert projection_noise_bound(4096) == pytest.approx(4.9e-4, rel=0.01)
    assert projection_noise_bound(128, tf32=True) == pytest.approx(4 * u_tf32, rel=0.01)
    assert residual_noise_bound(128, 32, tf32=True) == pytest.approx(2 * u_tf32 * (1 + 4 * 32**0.5), rel=0.02)


@pytest.mark.parametrize("basis_dtype", ["fp32", "bf16"])
def test_basis_rows_chosen_from_noise_are_dropped(basis_dtype):
    """A refresh on a gradient of rank 2 with a subspace of 4: the SVD's two other rows are an arbitrary completion
    (its null space); they are zeroed for the window, the two the gradient spans are kept as the SVD gave them."""
    g = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(12, 8, generator=g))
    opt = FrugalAdamW([{"params": [w], "rank": 4, "update_proj_gap": 10}], lr=0.1, density=None,
                      projector=SVDProjector(basis_dtype=basis_dtype))
    w.grad = torch.randn(12, 2, generator=g) @ torch.randn(2, 8, generator=g)
    opt.step()
    basis = opt.state[w]["proj_basis"]
    vh = torch.linalg.svd(w.grad, full_matrices=False)[2][:4].to(basis.dtype)
    assert torch.equal(basis[:2], vh[:2])
    assert torch.count_nonzero(basis[2:]) == 0


def _projected_pair(rule: str = "sign_sgd", **kwargs):
    """A 12 x 8 matrix under FRUGAL at density 0.25 (rank 2) and the same under ``inactive_update_rule="none"``."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 8))
    w_none = nn.Parameter(w.detach().clone())
    group = {"rank": 2, "update_proj_gap": 10, "scale": 1.0}
    opt = FrugalAdamW([{"params": [w], **group}], lr=0.1, inactive_update_rule=rule, **kwargs)
    opt_none = FrugalAdamW([{"params": [w_none], **group}], lr=0.1, inactive_update_rule="none", **kwargs)
    return w, opt, w_none, opt_none


@pytest.mark.parametrize("low_rank", [True, False], ids=["rank-2-gradient", "full-rank-gradient"])
def test_noise_residual_is_dropped_and_a_real_one_is_not(low_rank):
    """A rank-2 gradient (rank <= the subspace's 2) steps exactly as without a residual rule, for three steps in
    the basis of the first; a full-rank one takes the sign step of its residual, against float64: the weight
    moves by Adam's first step in the subspace plus lr * sign(G - G B^T B) outside it."""
    w, opt, w_none, opt_none = _projected_pair()
    g = torch.Generator().manual_seed(1)
    left = torch.randn(12, 2, generator=g)
    right = torch.randn(2, 8, generator=g)
    w0 = w.detach().double().clone()
    for step in range(3):
        grad = (left * (step + 1)) @ right if low_rank else torch.randn(12, 8, generator=g)
        w.grad, w_none.grad = grad.clone(), grad.clone()
        opt.step()
        opt_none.step()
        if low_rank:
            assert torch.equal(w, w_none), step
        elif step == 0:
            basis = opt.state[w]["proj_basis"].double()
            g64 = grad.double()
            low = g64 @ basis.T
            # Adam's first step: m = 0.1 g, v = 0.001 g^2, step size lr sqrt(1 - 0.999) / (1 - 0.9)
            adam = 0.1 * low / ((0.001 * low**2).sqrt() + 1e-8) * (0.1 * 0.001**0.5 / 0.1)
            expected = w0 - adam @ basis - 0.1 * torch.sign(g64 - low @ basis)
            torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=1e-6)
            assert not torch.equal(w, w_none)


def test_sgd_residual_is_not_thresholded():
    """The SGD rule steps on the residual itself: on noise, a step the size of the noise."""
    w, opt, w_none, opt_none = _projected_pair(rule="sgd")
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(12, 2, generator=g) @ torch.randn(2, 8, generator=g)
    w.grad, w_none.grad = grad.clone(), grad.clone()
    opt.step()
    opt_none.step()
    torch.testing.assert_close(w, w_none, rtol=0, atol=1e-6)


def test_every_path_applies_the_same_decision():
    """The in-place apply of one process, the materialized update of a ZeRO owner and layer-wise stepping agree bit
    for bit on a rank-deficient gradient (the decision rides in the residual's row scale)."""
    w, opt, _, _ = _projected_pair()
    grad = torch.randn(12, 2) @ torch.randn(2, 8)
    w_owner = nn.Parameter(w.detach().clone())
    owner = FrugalAdamW([{"params": [w_owner], "rank": 2, "update_proj_gap": 10, "scale": 1.0}], lr=0.1)
    w.grad = grad.clone()
    opt.step()
    update = owner.matrix_update(w_owner, grad.clone(), owner.param_groups[0], owner.state[w_owner])
    owner.apply_update_(w_owner.data, owner.param_groups[0], update)
    assert torch.equal(w, w_owner)

    layers = []
    for layerwise in (False, True):
        layer = nn.Linear(8, 12, bias=False)
        with torch.no_grad():
            layer.weight.copy_(_projected_pair()[0])
        opt = FrugalAdamW([{"params": [layer.weight], "rank": 2, "update_proj_gap": 10, "scale": 1.0}], lr=0.1)
        if layerwise:
            LayerwiseStepper(opt)  # steps the weight from its gradient hook, during backward
        layer(torch.ones(2, 8).cumsum(0)).pow(2).sum().backward()  # a batch of 2: a gradient of rank 2
        if not layerwise:
            opt.step()
        layers.append(layer.weight.detach())
    assert torch.equal(layers[0], layers[1])


@needs_triton
def test_fused_kernel_applies_the_same_decision():
    """Under the Triton kernel (compiled on a GPU, interpreted on the CPU) a rank-deficient gradient also steps as
    without a residual rule; the kernel's accumulation order differs from torch's, hence 1e-6 over 3 steps of 0.1."""
    runs = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(12, 8, device=DEVICE))
        opt = FrugalAdamW([{"params": [w], "rank": 2, "update_proj_gap": 10, "scale": 1.0}], lr=0.1)
        g = torch.Generator().manual_seed(1)
        right = torch.randn(2, 8, generator=g)  # every step's gradient rows in the span of the first's
        with kernels.use_backend(backend):
            for step in range(3):
                w.grad = (torch.randn(12, 2, generator=g) @ right).to(DEVICE)
                opt.step()
        runs.append(w.detach().cpu())
    torch.manual_seed(0)
    w_none = nn.Parameter(torch.randn(12, 8))
    opt_none = FrugalAdamW([{"params": [w_none], "rank": 2, "update_proj_gap": 10, "scale": 1.0}], lr=0.1,
                           inactive_update_rule="none")
    g = torch.Generator().manual_seed(1)
    right = torch.randn(2, 8, generator=g)
    for step in range(3):
        w_none.grad = torch.randn(12, 2, generator=g) @ right
        opt_none.step()
    torch.testing.assert_close(runs[0], w_none.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(runs[1], w_none.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [FrugalAdamW, FrugalAdamW8bit])
def test_least_squares_descends_on_every_seed(cls):
    """torch's 10 x 5 least-squares problem (a rank-1 weight gradient every step), 20 steps, 20 seeds: the loss
    falls on every one, as GaLore's does. (With signSGD on the noise it rose on some.)"""
    kwargs = {"min_8bit_size": 0} if cls is FrugalAdamW8bit else {}
    for seed in range(20):
        results = []
        for make in (lambda p: cls(p, rank=1, **kwargs), lambda p: GaLoreAdamW(p, rank=1)):
            w, b, x = problem(seed)
            opt = make([w, b])
            first = run(opt, w, b, x, steps=0)
            results.append((first, run(opt, w, b, x, steps=20)))
        (first, last), (_, galore_last) = results
        assert last < first, (seed, first, last, galore_last)


@pytest.mark.parametrize("difference", ["one-ulp-weights", "tensor-lr"])
def test_a_rounding_difference_stays_a_rounding_difference(difference):
    """Two runs of the rank-1 problem that differ by rounding (weights one ulp apart; or lr as a tensor, fp32 1e-3,
    against the float, fp64 1e-3) end 20 steps within one ulp of |W| ~ 3 (2.4e-7): signSGD on the noise took
    weights one ulp apart to 0.025-0.04 apart (seeds 0-3), lr * steps. The same holds for ZeRO ranks against one
    process (tests/sharding/test_zero.py)."""
    runs = []
    for other in (False, True):
        w, b, x = problem(2)
        if other and difference == "one-ulp-weights":
            with torch.no_grad():
                w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))
        lr = torch.tensor(1e-3) if other and difference == "tensor-lr" else 1e-3
        opt = FrugalAdamW([w, b], lr=lr, rank=1)
        run(opt, w, b, x, steps=20)
        runs.append(w.detach().clone())
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-6)
