"""Update rules against float64 recomputation from their definitions."""

import math

import pytest
import torch

from slimtrain.kernels.apply import ResidualOperands
from slimtrain.optimizers.functional import (
    STATE_FREE_RULES,
    Residual,
    adam_direction_reference,
    adam_step_size,
    fira_row_scale,
    rotate_moments_,
    state_free_residual,
)
from slimtrain.optimizers.projectors.dct import dct_rows


def test_adam_direction_and_step_size():
    torch.manual_seed(0)
    m, v = torch.rand(5, 3), torch.rand(5, 3)
    g = torch.randn(5, 3)
    m64, v64, g64 = m.double(), v.double(), g.double()
    d = adam_direction_reference(g, m, v, 0.9, 0.99, 1e-6)
    m_ref = 0.9 * m64 + 0.1 * g64
    v_ref = 0.99 * v64 + 0.01 * g64**2
    torch.testing.assert_close(m.double(), m_ref)
    torch.testing.assert_close(v.double(), v_ref)
    torch.testing.assert_close(d.double(), m_ref / (v_ref.sqrt() + 1e-6))
    assert math.isclose(adam_step_size(0.1, 0.9, 0.99, 3), 0.1 * math.sqrt(1 - 0.99**3) / (1 - 0.9**3))


def test_fira_row_scale_definition_and_limiter():
    torch.manual_seed(0)
    g, low, direction, back = torch.randn(6, 5), torch.randn(6, 2), torch.randn(6, 2), torch.randn(6, 5)
    row_sq = (g - back).square().sum(1)
    scale, norm = fira_row_scale(low, direction, row_sq, None, 1.01)
    s = scale[:, None] * (g - back)
    phi = direction.double().norm(dim=1) / (low.double().norm(dim=1) + 1e-8)
    ref = (g.double() - back.double()) * phi[:, None]
    torch.testing.assert_close(s.double(), ref)
    torch.testing.assert_close(norm.double(), ref.norm())
    # Growth above gamma is cut back to exactly gamma times the previous norm.
    prev = norm / 2
    scale2, norm2 = fira_row_scale(low, direction, row_sq, prev, 1.01)
    torch.testing.assert_close((scale2[:, None] * (g - back)).norm(), 1.01 * prev, rtol=1e-5, atol=0)
    torch.testing.assert_close(norm2, 1.01 * prev, rtol=1e-5, atol=0)
    # Shrinking is never amplified.
    scale3, _ = fira_row_scale(low, direction, row_sq, norm * 10, 1.01)
    torch.testing.assert_close(scale3, scale)


def test_rotation_is_exact_for_shared_dct_rows():
    n = 32
    old, new = torch.tensor([1, 4, 9, 20]), torch.tensor([4, 7, 20, 30])
    b_old, b_new = dct_rows(old, n, torch.device("cpu")), dct_rows(new, n, torch.device("cpu"))
    m, v = torch.randn(5, 4), torch.rand(5, 4)
    m0, v0 = m.clone(), v.clone()
    rotate_moments_(m, v, b_old, b_new)
    # frequency 4: old col 1 -> new col 0; 20: old col 3 -> new col 2; 7 and 30 are new: zero.
    torch.testing.assert_close(m[:, [0, 2]], m0[:, [1, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(v[:, [0, 2]], v0[:, [1, 3]], rtol=0, atol=1e-6)
    assert m[:, [1, 3]].abs().max() < 1e-6 and v[:, [1, 3]].abs().max() < 1e-6


def test_rotation_preserves_first_moment_inside_common_subspace():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    b_old = q[:3].float()
    rot, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    b_new = (rot @ q[:3]).float()  # same subspace, another basis
    m = torch.randn(4, 3)
    full_before = m.double() @ b_old.double()
    rotate_moments_(m, torch.rand(4, 3), b_old, b_new)
    torch.testing.assert_close(m.double() @ b_new.double(), full_before, rtol=0, atol=1e-5)


def test_state_free_rules():
    g, back = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.5, -2.5, 1.0]])
    assert state_free_residual(g, back, "sign_sgd").tolist() == [[1.0, 1.0, -1.0]]
    assert state_free_residual(g, back, "sgd").tolist() == [[0.5, 0.5, -0.5]]
    assert state_free_residual(g, back, "none") is None


def test_residual_speaks_the_state_free_rules_and_hands_the_kernel_one_bit():
    """One word per rule: FRUGAL's option values are the rules' names everywhere above the kernel, and the
    kernel's operands carry only whether ``f`` is ``sign``."""
    g, low = torch.zeros(2, 3), torch.zeros(2, 1)
    assert STATE_FREE_RULES == ("sign_sgd", "sgd", "none")
    assert Residual(g, low, "sign_sgd").operands().sign is True
    assert Residual(g, low, "sgd", coef=0.5, scale=0.1).operands() == ResidualOperands(g, low, False, 0.5, 0.1)
    with pytest.raises(ValueError, match=r"Invalid residual rule: 'sign' \(expected one of \('sign_sgd', 'sgd'\)\)"):
        Residual(g, low, "sign")


def _group(**over) -> dict:
    """A projected param group as the optimizer fills it, written out by hand: a rule reads nothing else."""
    group = dict(params=[], rank=3, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0, update_proj_gap=5,
                 scale=0.5, proj_type="std", projector="svd", moments="keep", stagger=False, decay_after_update=False,
                 state_bits=32, min_8bit_size=4096, block_size=256, bf16_stochastic_round=False, maximize=False)
    return {**group, **over}


@pytest.mark.parametrize("shape", [(12, 7), (5, 9)], ids=["tall", "wide"])
def test_a_rule_is_a_function_of_tensors(shape):
    """GaLore's rule called without an optimizer (a group dict, a state dict, a MatrixContext): its first
    step is ``scale * lr_t * Adam(G B^T) B`` with ``B`` the top-3 singular vectors of the projected side,
    against float64 (fp32 SVD and matmuls of these sizes agree to ~1e-6 relative); weight and gradient
    untouched. Its seed and index come from the context."""
    from slimtrain.optimizers.lowrank import LowRankRule
    from slimtrain.optimizers.projectors import SVDProjector
    from slimtrain.optimizers.rule import MatrixContext

    torch.manual_seed(0)
    weight, grad = torch.randn(shape), torch.randn(shape)
    kept = weight.clone(), grad.clone()
    group, state = _group(), {}
    step = LowRankRule().update(weight, grad, group, state, MatrixContext(4, 7, SVDProjector(), [group]))
    update = step.materialize()
    assert torch.equal(weight, kept[0]) and torch.equal(grad, kept[1])
    assert int(state["proj_seed"]) == 7 * 1_000_003 + 4 and int(state["step"]) == 1
    g = grad.double() if shape[0] >= shape[1] else grad.double().T  # the projected side last
    basis = torch.linalg.svd(g, full_matrices=False)[2][:3]
    low = g @ basis.T
    direction = (0.1 * low) / ((0.01 * low.square()).sqrt() + 1e-8)
    expected = 0.5 * adam_step_size(0.1, 0.9, 0.99, 1) * direction @ basis
    expected = expected if shape[0] >= shape[1] else expected.T
    # Singular vectors are defined up to sign; the update (a product of two of them) is not.
    torch.testing.assert_close(update.double(), expected, rtol=1e-5, atol=1e-6)
