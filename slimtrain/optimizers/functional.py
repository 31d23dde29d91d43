"""Update rules as free functions over tensors and numbers.

The optimizer classes only gather state and call these; these are what the tests check against
float64 math and peer packages, and what fused kernels and sharded steps reimplement.

Conventions: every tensor here is fp32; ``grad_t`` is the gradient in the oriented frame
(``m' x n'``, projected side last, see ``projectors/base.py``); ``low`` is its projection
(``m' x r``); ``direction`` is Adam's ``m / (sqrt(v) + eps)`` without bias correction, which lives in
the step size (as in torch's and galore-torch's AdamW).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Adam's moment update is defined once, beside its fused kernel; it is re-exported here with the rules.
from ..kernels.adam import adam_direction_reference as adam_direction_  # noqa: F401


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    r"""Bias-corrected step size :math:`\eta \sqrt{1-\beta_2^t} / (1-\beta_1^t)`."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def rotate_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, old_basis: Tensor, new_basis: Tensor) -> None:
    r"""Carry Adam moments from one subspace basis into another.

    With ``R = B_old @ B_new.T`` (r x r), the first moment's full-space value ``m @ B_old`` has
    coordinates ``m @ R`` in the new basis. The second moment is a per-coordinate variance; treating
    old coordinates as independent, the variance of a new coordinate is ``v @ (R * R)``. For bases
    that share rows (DCT, column selection) R is a 0/1 overlap matrix and this keeps the common
    coordinates exactly and zeroes the new ones.
    """
    overlap = old_basis @ new_basis.T
    exp_avg.copy_(exp_avg @ overlap)
    exp_avg_sq.copy_(exp_avg_sq @ overlap.square())


def fira_row_scale(
    low: Tensor,
    direction: Tensor,
    residual_row_sq: Tensor,
    prev_norm: Tensor | None,
    gamma: float,
) -> tuple[Tensor, Tensor]:
    r"""Fira's per-channel scale of the out-of-subspace gradient, norm-growth limiter included
    (arXiv:2410.01623).

    Each channel ``i`` (row of the oriented frame) of the residual ``G' - R B`` is scaled by
    :math:`\phi_i = \lVert N_i \rVert / (\lVert R_i \rVert + 10^{-8})`, the factor by which Adam
    changed that channel's norm inside the subspace. The limiter then caps the scaled residual's
    Frobenius norm at ``gamma`` times the previous step's: :math:`S \leftarrow S / \max(1, \lVert S\rVert /
    (\gamma \lVert S_{prev}\rVert))`. The residual itself is never needed here, only its squared row
    norms ``residual_row_sq`` (which :func:`slimtrain.kernels.apply.residual_row_sq_norms` computes
    without storing it), since :math:`\lVert S\rVert^2 = \sum_i \phi_i^2 \lVert (G' - RB)_i\rVert^2`.

    Returns ``(row_scale, norm_to_remember)``: ``S = row_scale[:, None] * (G' - R B)``.
    """
    phi = direction.norm(dim=1) / (low.norm(dim=1) + 1e-8)
    norm = (phi.square() * residual_row_sq).sum().sqrt()
    if prev_norm is None:
        return phi, norm
    limiter = torch.clamp(norm / (prev_norm + 1e-8), min=gamma) / gamma
    return phi / limiter, norm / limiter


def state_free_residual(grad_t: Tensor, back_low: Tensor, rule: str) -> Tensor | None:
    """FRUGAL's state-free update for the part of the gradient outside the subspace."""
    if rule == "none":
        return None
    residual = grad_t - back_low
    return residual.sign_() if rule == "sign_sgd" else residual


def sst_factor_grads(grad: Tensor, u: Tensor, v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gradients of SST's factors from the weight gradient ``G`` of :math:`W = U\,\mathrm{diag}(\Sigma)V^\top`.

    :math:`\nabla\Sigma_i = U_i^\top G V_i` for every i, and the paper's "enhanced" gradients of the
    sampled vectors, :math:`G V_S` and :math:`G^\top U_S` (the chain rule's factor :math:`\Sigma_i`
    dropped, so small singular values still move their vectors). One ``G @ V`` serves both.
    """
    gv = grad @ v
    return (gv * u).sum(0), gv.index_select(1, idx), grad.T @ u.index_select(1, idx)
