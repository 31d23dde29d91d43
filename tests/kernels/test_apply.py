"""The fused project-back-and-apply kernel and the residual row norms against their torch references."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slimtrain import kernels
from slimtrain.kernels.apply import (
    ResidualOperands,
    lowrank_apply_,
    lowrank_apply_reference,
    residual_reference,
    residual_row_sq_norms,
    residual_row_sq_norms_reference,
    residual_with_row_sq_norms,
)

from .conftest import DEVICE

# (m', n', r): odd sizes that are not multiples of any tile, a rank below tl.dot's minimum of 16, a
# single row, and a rank above one K tile.
SHAPES = [(37, 53, 5), (1, 70, 1), (64, 48, 19)]


def _case(m, n, r, w_dtype, g_dtype, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, m, generator=g).to(w_dtype).T if transposed else torch.randn(m, n, generator=g).to(w_dtype)
    grad = torch.randn(m, n, generator=g).to(g_dtype)
    basis = torch.linalg.qr(torch.randn(n, r, generator=g))[0].T.contiguous()
    low = grad.float() @ basis.T
    direction = torch.randn(m, r, generator=g)
    return [t.to(DEVICE) for t in (weight, grad, basis, low, direction)]


def _residual(grad, low, sign, row_scale, m, seed=1):
    scale = torch.rand(m, generator=torch.Generator().manual_seed(seed)).to(DEVICE) if row_scale else None
    return ResidualOperands(grad, low, sign, coef=0.75, scale=0.01, row_scale=scale)


def _assert_within_one_ulp(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Both compute in fp32 and round once; accumulation order may move a value across a rounding
    boundary of a low-precision weight, never further."""
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
        return
    ulp = torch.finfo(actual.dtype).eps * expected.float().abs().clamp_min(torch.finfo(actual.dtype).tiny)
    assert ((actual.float() - expected.float()).abs() <= ulp).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed-view"])
@pytest.mark.parametrize("residual", [False, True], ids=["no-residual", "residual"])
def test_apply_matches_reference(shape, w_dtype, transposed, residual, triton_backend):
    m, n, r = shape
    weight, grad, basis, low, direction = _case(m, n, r, w_dtype, w_dtype, transposed)
    residual = _residual(grad, low, False, True, m) if residual else None
    expected = weight.clone()
    lowrank_apply_reference(expected, direction, basis, 0.1, residual, decay_before=0.99, decay_after=0.98)
    lowrank_apply_(weight, direction, basis, alpha=0.1, residual=residual, decay_before=0.99, decay_after=0.98)
    _assert_within_one_ulp(weight, expected)


@pytest.mark.parametrize("row_scale", [False, True])
def test_sign_residual_matches_reference(row_scale, triton_backend):
    m, n, r = SHAPES[0]
    weight, grad, basis, low, direction = _case(m, n, r, torch.float32, torch.bfloat16, transposed=True)
    residual = _residual(grad, low, True, row_scale, m)
    expected = weight.clone()
    lowrank_apply_reference(expected, direction, basis, 0.1, residual)
    lowrank_apply_(weight, direction, basis, alpha=0.1, residual=residual)
    # sign() of a residual within rounding of zero may differ; elsewhere the results agree to fp32.
    decided = residual_reference(dataclasses.replace(residual, sign=False, row_scale=None), basis).abs() > 1e-5
    torch.testing.assert_close(weight[decided], expected[decided], rtol=1e-6, atol=1e-6)
    assert decided.float().mean() > 0.99


def test_apply_writes_only_the_weight(triton_backend):
    weight, grad, basis, low, direction = _case(37, 53, 5, torch.float32, torch.float32, transposed=False)
    residual = _residual(grad, low, False, True, 37)
    inputs = [grad, basis, low, direction, residual.row_scale]
    before = [t.clone() for t in inputs]
    lowrank_apply_(weight, direction, basis, alpha=0.1, residual=residual)
    assert all(torch.equal(a, b) for a, b in zip(inputs, before))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
def test_row_norms_match_reference(shape, g_dtype, triton_backend, poison):
    m, n, r = shape
    _, grad, basis, low, _ = _case(m, n, r, torch.float32, g_dtype, transposed=False)
    grad_t = grad.T.contiguous().T  # a transposed view, as the optimizer passes for left projections
    got = residual_row_sq_norms(grad_t, low, basis, 0.75)
    torch.testing.assert_close(got, residual_row_sq_norms_reference(grad_t, low, basis, 0.75), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_torch_path_reuses_the_materialized_residual_bit_for_bit(shape, w_dtype):
    """On the torch backend the row norms hand back the residual they materialized; applying ResidualOperands
    that carry it gives exactly what recomputing R B gives, and consumes it (it is scratch)."""
    m, n, r = shape
    weight, grad, basis, low, direction = _case(m, n, r, w_dtype, w_dtype, transposed=True)
    grad_t = grad.T.contiguous().T
    with kernels.use_backend("torch"):
        materialized, row_sq = residual_with_row_sq_norms(grad_t, low, basis, 0.75)
        assert torch.equal(row_sq, residual_row_sq_norms_reference(grad_t, low, basis, 0.75))
        assert torch.equal(row_sq, residual_row_sq_norms(grad_t, low, basis, 0.75))
        kept = materialized.clone()
        residual = dataclasses.replace(_residual(grad_t, low, False, True, m), materialized=materialized)
        expected = weight.clone()
        lowrank_apply_(expected, direction, basis, alpha=0.1, residual=dataclasses.replace(residual, materialized=None),
                       decay_before=0.99)
        lowrank_apply_(weight, direction, basis, alpha=0.1, residual=residual, decay_before=0.99)
    assert torch.equal(weight, expected)
    assert not torch.equal(materialized, kept)  # used, in place, rather than recomputed


def test_triton_path_keeps_no_residual(triton_backend):
    _, grad, basis, low, _ = _case(37, 53, 5, torch.float32, torch.float32, transposed=False)
    materialized, row_sq = residual_with_row_sq_norms(grad, low, basis, 0.75)
    assert materialized is None
    torch.testing.assert_close(row_sq, residual_row_sq_norms_reference(grad, low, basis, 0.75), rtol=1e-5, atol=1e-6)


def test_reference_is_the_formula_in_float64():
    m, n, r = SHAPES[0]
    weight, grad, basis, low, direction = _case(m, n, r, torch.float32, torch.float32, transposed=False)
    residual = _residual(grad, low, False, True, m)
    w64 = weight.double()
    res64 = (grad.double() - 0.75 * low.double() @ basis.double()) * residual.row_scale.double()[:, None]
    expected = 0.98 * (0.99 * w64 - 0.1 * direction.double() @ basis.double() - 0.01 * res64)
    lowrank_apply_reference(weight, direction, basis, 0.1, residual, 0.99, 0.98)
    torch.testing.assert_close(weight.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"basis": torch.zeros(5, 52)}, r"Invalid basis: torch.float32 of shape \(5, 52\) \(expected torch.float32 of shape \(r, 53\)\)"),
        ({"direction": torch.zeros(37, 4)}, r"Invalid direction: torch.float32 of shape \(37, 4\) \(expected torch.float32 of shape \(37, 5\)\)"),
        ({"weight": torch.zeros(37)}, r"Invalid weight: 1-D"),
        ({"sign": "relu"}, r"Invalid residual sign: 'relu' \(expected True or False\)"),
        ({"row_scale": torch.ones(36)}, r"Invalid residual row_scale: torch.float32 of shape \(36,\)"),
        ({"materialized": torch.zeros(53, 37)},
         r"Invalid residual materialized: torch.float32 of shape \(53, 37\) \(expected torch.float32 \(37, 53\)\)"),
    ],
)
def test_bad_inputs_name_the_parameter(change, message):
    weight, grad, basis, low, direction = _case(37, 53, 5, torch.float32, torch.float32, transposed=False)
    residual = ResidualOperands(grad, low, change.get("sign", False), row_scale=change.get("row_scale"),
                                materialized=change.get("materialized"))
    with pytest.raises(ValueError, match=message):
        lowrank_apply_(change.get("weight", weight), change.get("direction", direction), change.get("basis", basis),
                       alpha=0.1, residual=residual)


def test_autotuning_the_in_place_kernel_restores_the_weight():
    from slimtrain.kernels import apply

    # Each autotuning trial runs the kernel on the real weight; without restore_value the step would be
    # applied once per trial. (Autotuning itself needs a GPU; on CPU the launcher uses one fixed tile.)
    assert apply._lowrank_apply_tuned.restore_value == ["w_ptr"]
