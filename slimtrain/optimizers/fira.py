"""Fira (Chen et al., arXiv:2410.01623): GaLore plus the out-of-subspace gradient, rescaled."""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.apply import residual_with_row_sq_norms
from ._validation import check_choice
from .base import LowRankAdamW
from .eight_bit import EightBitStates
from .functional import Residual, fira_row_scale
from .lowrank import LowRankRule, LowRankStep
from .registry import register_method
from .state import Slot

RESIDUAL_MODES = ("orthogonal", "fira_code")


class FiraRule(LowRankRule):
    """GaLore's rule plus Fira's residual: ``G' - c R B`` scaled per row by Adam's own per-row rescaling, under
    a norm-growth limiter whose previous norm is the rule's one piece of extra state."""

    name = "fira"
    options = ("gamma", "residual")

    def residual(self, group: dict, state: dict, step: LowRankStep, step_size: float) -> Residual:
        coef = group["scale"] if group["residual"] == "fira_code" else 1.0
        # On the torch backend the norms need G' - c R B in full: keep it for the apply (materialized)
        # rather than computing it twice. The Triton kernels compute it twice and never store it.
        materialized, row_sq = residual_and_row_sq_norms(step, coef)
        frame = step.frame
        row_scale, norm = fira_row_scale(step.low, step.direction, frame.sum_cols(row_sq), state.get("residual_norm"),
                                         group["gamma"], sum_rows=frame.sum_rows)
        state["residual_norm"] = norm
        return Residual(step.grad_t, step.low, "sgd", coef, step_size, row_scale, materialized)

    def residual_slots(self, group: dict) -> list[Slot]:
        return [Slot("residual_norm", (), torch.float32)]


def residual_and_row_sq_norms(step: LowRankStep, coef: float) -> tuple[Tensor | None, Tensor]:
    """``(residual, row_sq)``: ``sum_j (G' - c R B)_ij^2`` per row, through the fused kernel when the basis is
    dense, and ``G' - c R B`` itself wherever it had to be materialized for that (the torch backend,
    projectors without a dense basis), ``None`` where the kernel did without. Put it in
    :attr:`Residual.materialized`: applying the step then reuses it instead of computing it again."""
    if step.basis is not None:
        return residual_with_row_sq_norms(step.grad_t, step.low, step.basis, coef)
    back_low = step.projector.project_back(step.low, step.state, step.grad_t.shape[1])
    residual = step.grad_t.float() - back_low.mul_(coef)
    return residual, residual.square().sum(1)


class FiraAdamW(LowRankAdamW):
    r"""Fira: full-rank training under GaLore's memory budget.

    GaLore throws away the part of the gradient outside its subspace. Fira adds it back, scaled per
    channel by how much Adam rescaled that channel inside the subspace, so the update stays full
    rank at no extra state but one scalar per matrix:

    .. math::
        \phi_i = \frac{\lVert N_{t,i} \rVert}{\lVert R_{t,i} \rVert},\quad
        S_t = \phi \odot (G_t - R_t B),\quad
        W_t = W_{t-1} - \eta_t (\alpha N_t B + S_t)

    and a norm-growth limiter keeps :math:`\lVert S_t\rVert \le \gamma \lVert S_{t-1}\rVert`
    (:math:`\gamma` = 1.01 in every experiment of the paper). At ranks as low as 4-16, Fira stays near
    full-rank Adam where GaLore degrades.

    Args:
        gamma: the limiter's growth bound (default 1.01; must be >= 1).
        residual: ``"orthogonal"`` (default, the paper): the residual is ``G - R B``, the true
            out-of-subspace gradient. ``"fira_code"``: ``G - scale * R B``, what the official code and
            the ``fira`` package compute; with ``scale != 1`` it leaves part of the in-subspace
            gradient in the residual. Use it to reproduce ``fira.FiraAdamW`` (tested).
        Other arguments: see :class:`~slimtrain.optimizers.base.LowRankAdamW`.
    """

    default_projector = "svd"
    default_moments = "keep"
    rule_type = FiraRule

    def __init__(self, params, lr: float = 1e-3, *args, gamma: float = 1.01, residual: str = "orthogonal", **kwargs):
        if not (isinstance(gamma, (int, float)) and gamma >= 1.0):
            raise ValueError(f"Invalid gamma: {gamma} (expected a number >= 1)")
        check_choice("residual", residual, RESIDUAL_MODES)
        super().__init__(params, lr, *args, gamma=gamma, residual=residual, **kwargs)


class FiraAdamW8bit(EightBitStates, FiraAdamW):
    """:class:`FiraAdamW` with 8-bit Adam moments (``state_bits=8``);
    see :class:`~slimtrain.optimizers.eight_bit.EightBitStates`."""


# The paper's pre-training setting, as GaLore's: lr 0.01, scale 0.25, a refresh every 200 steps.
register_method("fira", FiraAdamW, FiraAdamW8bit, recipe=dict(lr=1e-2, update_proj_gap=200, scale=0.25))
