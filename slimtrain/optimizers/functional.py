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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Adam's moment update is defined once, beside its fused kernel; its reference is re-exported here with the
# rules, under the reference's name: the optimizers call the dispatched op, ``kernels.adam_direction_``.
from ..kernels.adam import adam_direction_reference  # noqa: F401
from ..kernels.apply import ResidualOperands

#: The state-free rules for the gradient outside the subspace, FRUGAL's words (arXiv:2411.07837), which are
#: also the values of ``FrugalAdamW(inactive_update_rule=...)``: ``"sign_sgd"`` steps on its sign, ``"sgd"``
#: on the residual itself, ``"none"`` discards it (GaLore).
STATE_FREE_RULES = ("sign_sgd", "sgd", "none")


def descent(grad: Tensor, maximize: bool) -> Tensor:
    """The direction a step descends: ``grad``, or ``-grad`` (a new tensor, so the caller's, often ``p.grad``
    itself, is never written) when the objective is maximized, as ``torch.optim.AdamW(maximize=True)``."""
    return -grad if maximize else grad


def closure_loss(closure: Callable[[], float] | None):
    """What ``step(closure)`` returns: the loss ``closure`` computes with gradients enabled (``step`` itself runs
    under ``no_grad``), as torch.optim's optimizers do; ``None`` without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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
    sum_rows: Callable[[Tensor], Tensor] | None = None,
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

    ``sum_rows`` completes a sum over rows where the rows are split across ranks (FSDP2: an all-reduce of the
    partial sum, :mod:`slimtrain.optimizers.layout`); by default the rows given are all of them.

    Returns ``(row_scale, norm_to_remember)``: ``S = row_scale[:, None] * (G' - R B)``.
    """
    phi = channel_norm_ratio(low, direction)
    norm_sq = (phi.square() * residual_row_sq).sum()
    norm = (norm_sq if sum_rows is None else sum_rows(norm_sq)).sqrt()
    if prev_norm is None:
        return phi, norm
    limiter = norm_growth_limiter(norm, prev_norm, gamma)
    return phi / limiter, norm / limiter


def channel_norm_ratio(low: Tensor, direction: Tensor) -> Tensor:
    r"""By how much Adam changed each channel's norm in the subspace: :math:`\lVert N_i \rVert /
    (\lVert R_i \rVert + 10^{-8})` for every row ``i`` of the oriented frame (Fira's :math:`\phi_i`, APOLLO's
    channel-wise scaling factor). Row-local: a rank holding whole rows of ``R`` and ``N`` needs no message."""
    return direction.norm(dim=1) / (low.norm(dim=1) + 1e-8)


def norm_growth_limiter(norm: Tensor, prev_norm: Tensor, gamma: float) -> Tensor:
    r"""The divisor of Fira's norm-growth limiter (arXiv:2410.01623, also APOLLO's): an update whose norm grew by
    more than ``gamma`` since the previous step's (remembered after limiting) is divided by
    :math:`\max(\lVert S_t\rVert / (\lVert S_{t-1}\rVert + 10^{-8}), \gamma) / \gamma`, so that
    :math:`\lVert S_t\rVert \le \gamma \lVert S_{t-1}\rVert`; 1 where it grew less. A 0-d tensor."""
    return torch.clamp(norm / (prev_norm + 1e-8), min=gamma) / gamma


#: APOLLO's scaling granularities (``scale_type``): one factor per channel (row of the oriented frame), or one for
#: the whole tensor (APOLLO-Mini).
APOLLO_SCALE_TYPES = ("channel", "tensor")


def apollo_row_scale(
    low: Tensor,
    direction: Tensor,
    grad_row_sq: Tensor | None,
    prev_norm: Tensor | None,
    *,
    scale_type: str,
    scale: float,
    scale_front: bool = False,
    gamma: float | None = 1.01,
    sum_rows: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    r"""APOLLO's factor on the raw gradient (Zhu et al., arXiv:2412.05270), norm-growth limiter included.

    Adam ran on ``R``, a norm-preserving random projection of the gradient, giving ``N``. By how much it changed
    the norm of each channel (``scale_type="channel"``: each row ``i`` of the oriented frame,
    :func:`channel_norm_ratio`) or of the whole tensor (``"tensor"``, APOLLO-Mini:
    :math:`\lVert N\rVert / (\lVert R\rVert + 10^{-8})`) approximates by how much full-rank Adam would have, and
    the raw gradient is scaled by that, times :math:`\sqrt{\text{scale}}` (apollo-torch's convention: ``scale``
    128 multiplies by 11.3). With ``gamma`` the scaled gradient :math:`S` then goes through the norm-growth
    limiter (:func:`norm_growth_limiter`); ``scale_front`` puts :math:`\sqrt{\text{scale}}` before the limiter
    instead of after it, as apollo-torch's option does (the same update unless ``scale`` changes between steps).
    Only the squared row norms of the gradient, ``grad_row_sq``, are needed for the limiter (``None`` without one),
    since :math:`\lVert S\rVert^2 = \sum_i s_i^2 \lVert G'_i\rVert^2`.

    ``sum_rows`` completes a sum over rows where the rows are split across ranks (an all-reduce of a scalar: the
    tensor-wise norms and the limiter's norm); by default the rows given are all of them. Channel factors are
    row-local.

    Returns ``(row_scale, norm_to_remember)``: the update is ``row_scale[:, None] * G'`` (channel) or
    ``row_scale * G'`` (tensor, a 0-d tensor), before the step size; the norm is ``None`` without a limiter.
    """
    total = (lambda t: t) if sum_rows is None else sum_rows
    if scale_type == "channel":
        factor = channel_norm_ratio(low, direction)
    else:
        sums = total(torch.stack([direction.square().sum(), low.square().sum()]))
        factor = sums[0].sqrt() / (sums[1].sqrt() + 1e-8)
    root = math.sqrt(scale)
    if scale_front:
        factor = factor * root
    if gamma is None:
        return (factor if scale_front else factor * root), None
    norm = total((factor.square() * grad_row_sq).sum()).sqrt()
    if prev_norm is not None:
        limiter = norm_growth_limiter(norm, prev_norm, gamma)
        factor, norm = factor / limiter, norm / limiter
    return (factor if scale_front else factor * root), norm


def state_free_residual(grad_t: Tensor, back_low: Tensor, rule: str) -> Tensor | None:
    """FRUGAL's state-free update for the part of the gradient outside the subspace (``rule``: one of
    :data:`STATE_FREE_RULES`), as a tensor; ``None`` for ``"none"``."""
    if rule == "none":
        return None
    residual = grad_t - back_low
    return residual.sign_() if rule == "sign_sgd" else residual


@dataclass(frozen=True)
class Residual:
    r"""What a low-rank method does with the gradient outside its subspace, in one step: the term
    :math:`\beta\, s \odot f(G' - c\, R B)` that the weight moves by besides Adam's subspace step.

    ``rule`` is a state-free rule of :data:`STATE_FREE_RULES` (``"none"`` is no :class:`Residual` at all):
    ``"sign_sgd"`` (FRUGAL's default, :math:`f = \mathrm{sign}`) or ``"sgd"`` (FRUGAL's SGD, and Fira,
    whose residual takes an SGD step rescaled per row). It is applied by the fused
    :func:`slimtrain.kernels.apply.lowrank_apply_`, which takes :meth:`operands`.

    Args:
        grad: ``G'``, the gradient in the oriented frame (``m' x n'``, any float dtype, any strides).
        low: ``R``, its projection (``m' x r``, fp32).
        rule: ``"sgd"`` (default) or ``"sign_sgd"``.
        coef: ``c`` (1 for the orthogonal residual; Fira's code uses its ``scale``).
        scale: ``beta``, the residual's step size in weight units.
        row_scale: ``s``, one fp32 factor per row (Fira's :math:`\phi_i` over its limiter), or ``None``.
        materialized: ``G' - c R B`` already computed (fp32 ``m' x n'``) or ``None``: see
            :attr:`slimtrain.kernels.apply.ResidualOperands.materialized`.
    """

    grad: Tensor
    low: Tensor
    rule: str = "sgd"
    coef: float = 1.0
    scale: float = 1.0
    row_scale: Tensor | None = None
    materialized: Tensor | None = None

    def __post_init__(self):
        if self.rule not in STATE_FREE_RULES[:2]:
            raise ValueError(f"Invalid residual rule: {self.rule!r} (expected one of {STATE_FREE_RULES[:2]})")

    def operands(self) -> ResidualOperands:
        """The fused kernel's operands for this term."""
        return ResidualOperands(self.grad, self.low, self.rule == "sign_sgd", self.coef, self.scale, self.row_scale,
                                self.materialized)


def sst_factor_grads(grad: Tensor, u: Tensor, v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Gradients of SST's factors from the weight gradient ``G`` of :math:`W = U\,\mathrm{diag}(\Sigma)V^\top`.

    :math:`\nabla\Sigma_i = U_i^\top G V_i` for every i, and the paper's "enhanced" gradients of the
    sampled vectors, :math:`G V_S` and :math:`G^\top U_S` (the chain rule's factor :math:`\Sigma_i`
    dropped, so small singular values still move their vectors). One ``G @ V`` serves both.
    """
    gv = grad @ v
    return (gv * u).sum(0), gv.index_select(1, idx), grad.T @ u.index_select(1, idx)
