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


def adam_step_size(lr: float, beta1: float, beta2: float, step: int) -> float:
    r"""Bias-corrected step size :math:`\eta \sqrt{1-\beta_2^t} / (1-\beta_1^t)`."""
    return lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)


def adam_direction_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
    r"""Update both moments in place and return :math:`m_t / (\sqrt{v_t} + \epsilon)`.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2
    """
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


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


def fira_residual(
    grad_t: Tensor,
    low: Tensor,
    direction: Tensor,
    back_low: Tensor,
    prev_norm: Tensor | None,
    gamma: float,
) -> tuple[Tensor, Tensor]:
    r"""Fira's rescaled out-of-subspace gradient with the norm-growth limiter (arXiv:2410.01623).

    Each channel ``i`` (row of the oriented frame) of the residual ``G' - back_low`` is scaled by
    :math:`\phi_i = \lVert N_i \rVert / (\lVert R_i \rVert + 10^{-8})`, the factor by which Adam
    changed that channel's norm inside the subspace. The limiter then caps the residual's Frobenius
    norm at ``gamma`` times the previous step's: :math:`S \leftarrow S / \max(1, \lVert S\rVert /
    (\gamma \lVert S_{prev}\rVert))`.

    Returns ``(S, norm_to_remember)``.
    """
    phi = direction.norm(dim=1, keepdim=True) / (low.norm(dim=1, keepdim=True) + 1e-8)
    scaled = (grad_t - back_low) * phi
    norm = torch.linalg.vector_norm(scaled)
    if prev_norm is None:
        return scaled, norm
    limiter = torch.clamp(norm / (prev_norm + 1e-8), min=gamma) / gamma
    return scaled / limiter, norm / limiter


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
