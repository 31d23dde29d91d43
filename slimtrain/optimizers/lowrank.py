"""GaLore's step rule, which Fira, FRUGAL's subspace mode and the DCT optimizer extend: refresh a subspace
on schedule, project the gradient, run Adam there, and (for the methods that have one) add a rule for the
part of the gradient outside the subspace.

Everything happens in the oriented frame of ``projectors/base.py``: ``G'`` (``m' x n'``) is the gradient,
transposed when the projection is on the left, so that the projected side is always the last dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.apply import lowrank_apply_, residual_from_back
from .functional import Residual, adam_step_size, rotate_moments_
from .layout import WholeFrame
from .moments import zero_moments_
from .projectors import Projector
from .rule import Capabilities, MatrixContext, StepRule, check_rank_fits, matrix_shape
from .state import ADAM, Slot, counters, moment_slots
from .updates import RoundingStream, Update, apply_, decay_factors, group_lr, rounds_stochastically


def projects_left(shape: torch.Size, proj_type: str) -> bool:
    """Whether the projection compresses the rows (left, ``P.T @ G``) rather than the columns.

    ``std`` compresses the smaller dimension (galore-torch's rule, ties go right), ``reverse_std`` the
    larger, ``left``/``right`` force a side.
    """
    m, n = shape
    if proj_type == "std":
        return m < n
    if proj_type == "reverse_std":
        return m >= n
    return proj_type == "left"


@dataclass
class LowRankStep(Update):
    """One matrix's step in the oriented frame, before it touches the weight: the weight moves by
    ``-(alpha * direction @ basis + residual term)``."""

    grad_t: Tensor  # G' (m' x n'), fp32 or the parameter's dtype, possibly a transposed view
    low: Tensor  # R = G' B^T (m' x r)
    direction: Tensor  # Adam's m / (sqrt(v) + eps) in the subspace (m' x r)
    alpha: float  # the subspace step in weight units: scale * bias-corrected lr
    basis: Tensor | None  # B (r x n'), None for projectors without a dense basis (columns)
    # Under FSDP2 these are one rank's part: grad_t its piece of G', low and direction the rows and basis the
    # columns that project back onto it (layout.for_back_projection).
    transposed: bool
    projector: Projector
    state: dict
    residual: Residual | None = None
    frame: WholeFrame | None = None  # where G' lives (layout.py): what completes a sum over its rows or columns

    def apply_(self, p: Tensor, group: dict, rounding: RoundingStream | None) -> None:
        """In place through the fused kernel (:func:`slimtrain.kernels.apply.lowrank_apply_`), never building
        the full update, wherever the basis is dense and the weight needs no stochastic rounding."""
        if self.basis is None or not p.is_contiguous() or rounds_stochastically(p, group):
            apply_(p, group, self.materialize().reshape(p.shape), 1.0, rounding)
            return
        weight = p.view(matrix_shape(p))
        before, after = decay_factors(group)
        residual = self.residual.operands() if self.residual is not None else None
        lowrank_apply_(weight.T if self.transposed else weight, self.direction, self.basis, alpha=self.alpha,
                       residual=residual, decay_before=before, decay_after=after)

    def materialize(self) -> Tensor:
        """In the user's orientation, with the same arithmetic as the fused kernel's torch reference (so a
        ZeRO owner and one process agree exactly on CPU)."""
        update = self._back(self.direction).mul_(self.alpha)
        residual = self.residual
        if residual is not None:
            back_low = None
            if residual.materialized is None:
                back_low = self._back(residual.low)
            update.add_(residual_from_back(residual.operands(), back_low), alpha=residual.scale)
        return update.T if self.transposed else update

    def _back(self, low: Tensor) -> Tensor:
        """``low @ B``: through the dense basis where there is one (the same numbers as the projector's
        ``project_back``), else the projector's own (column selection)."""
        if self.basis is not None:
            return low @ self.basis
        return self.projector.project_back(low, self.state, self.grad_t.shape[1])


class LowRankRule(StepRule):
    """GaLore: Adam on ``G' B^T`` in a subspace refreshed every ``update_proj_gap`` steps; the gradient
    outside it is discarded. Subclasses change :meth:`rank_for` and :meth:`residual`."""

    name = "galore"
    capabilities = Capabilities()

    def validate_group(self, group: dict) -> None:
        check_rank_fits(group)

    def rank_for(self, group: dict, shape_t: torch.Size) -> int:
        """The subspace dimension for a matrix whose oriented shape is ``shape_t``."""
        return group["rank"]

    def residual(self, group: dict, state: dict, step: LowRankStep, step_size: float) -> Residual | None:
        """The method's rule for the gradient outside the subspace (see
        :class:`~slimtrain.optimizers.functional.Residual`), or ``None`` (GaLore: discarded). ``step_size`` is
        Adam's bias-corrected learning rate for this step; ``step.frame`` completes a statistic summed over the
        matrix's rows or columns where this process holds a part of it."""
        return None

    def residual_slots(self, group: dict) -> list[Slot]:
        """State :meth:`residual` keeps (Fira: its limiter's norm)."""
        return []

    def update(self, p: Tensor, grad: Tensor, group: dict, state: dict, ctx: MatrixContext) -> LowRankStep:
        """Refresh the subspace if due, project, run Adam in the subspace and ask for the residual rule:
        everything but touching the weight."""
        projector = ctx.projector
        layout = ctx.layout_for(p)
        transposed = projects_left(layout.matrix_shape, group["proj_type"])
        frame = layout.oriented(transposed)
        n = frame.shape[1]
        grad_t = grad.T if transposed else grad
        grad32 = grad_t.float()  # no copy for fp32; the residual reads grad_t as it is
        moments = frame.moments(self.rank_for(group, torch.Size(frame.shape)))
        if not state:
            self.init_state(grad, group, state, ctx, moments)
        if self.refresh_due(group, state):
            self.refresh(projector, group, state, grad32, transposed, frame, moments)
        basis = projector.dense_basis(state, n, grad_t.device)
        if basis is None and not frame.row_local:  # a projection summed across ranks needs the dense basis
            basis = projector.basis(state, n, grad_t.device)
        low = self.project(frame, grad32, basis, projector, state)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["iters"] += 1
        direction = moments.adam_direction(state, group, low)
        step_size = adam_step_size(group_lr(group), beta1, beta2, int(state["step"]))
        direction, low, basis = frame.for_back_projection(direction, low, basis)
        step = LowRankStep(grad_t, low, direction, group["scale"] * step_size, basis, transposed, projector, state,
                           frame=frame)
        step.residual = self.residual(group, state, step, step_size)
        return step

    def project(self, frame, grad_t: Tensor, basis: Tensor | None, projector: Projector, state: dict) -> Tensor:
        """``R = G' B^T`` from the oriented fp32 gradient (this process's part of it; ``frame`` sums the partial
        products where the ranks hold columns of ``G'``): through the dense basis where there is one, else the
        projector's own (column selection). APOLLO scales it to preserve norms."""
        return frame.project(grad_t, basis) if basis is not None else projector.project(grad_t, state)

    def init_state(self, grad: Tensor, group: dict, state: dict, ctx: MatrixContext, moments) -> None:
        state["step"] = torch.zeros((), dtype=torch.int64)
        state["iters"] = torch.zeros((), dtype=torch.int64)
        offset = 0
        if group["stagger"]:
            # Spread the group's matrices over the refresh window by their position in the optimizer.
            offset = (ctx.index * group["update_proj_gap"]) // max(ctx.num_params, 1)
        state["refresh_offset"] = torch.tensor(offset, dtype=torch.int64)
        ctx.projector.init_state(state, seed=ctx.param_seed)
        moments.init(state, group, ADAM, grad.device)

    @staticmethod
    def refresh_due(group: dict, state: dict) -> bool:
        if int(state["proj_refreshes"]) == 0:
            return True
        it = int(state["iters"]) - int(state["refresh_offset"])
        return it >= 0 and it % group["update_proj_gap"] == 0

    def refresh(self, projector: Projector, group: dict, state: dict, grad_t: Tensor, transposed: bool, frame,
                moments) -> None:
        """A new subspace from the oriented fp32 gradient (this process's part of it: ``frame`` refreshes), and
        the group's moment policy applied to it (on the ``moments`` storage)."""
        policy = group["moments"]
        first = int(state["proj_refreshes"]) == 0
        n = frame.shape[1]
        old_basis = None
        if policy == "rotate" and not first:
            old_basis = projector.basis(state, n, grad_t.device)
        frame.refresh(projector, grad_t, state, self.rank_for(group, torch.Size(frame.shape)), transposed)
        if first:
            if not frame.any(bool(grad_t.any()), grad_t.device):  # over the whole matrix: every rank decides alike
                # A gradient of zeros spans nothing (torch.distributed.checkpoint creates a fresh optimizer's state
                # with a zero-gradient, zero-lr step): the subspace is chosen again from the next step's gradient,
                # the one a fresh optimizer would start from, instead of kept for a whole window.
                state["proj_refreshes"].zero_()
            return
        if policy == "reset":
            zero_moments_(state, ADAM)
            state["step"].zero_()
        elif policy == "rotate":
            with moments.fp32_moments(state, group, ADAM) as (exp_avg, exp_avg_sq):
                rotate_moments_(exp_avg, exp_avg_sq, old_basis, projector.basis(state, n, grad_t.device))

    def state_spec(self, p: Tensor, group: dict, ctx: MatrixContext) -> list[Slot]:
        shape = matrix_shape(p)
        m, n = (shape[1], shape[0]) if projects_left(shape, group["proj_type"]) else shape
        rank = self.rank_for(group, torch.Size((m, n)))
        return (counters("step", "iters", "refresh_offset") + ctx.projector.state_spec(rank, n)
                + moment_slots(group, ADAM, (m, rank)) + self.residual_slots(group))

    def describe_rank(self, group: dict) -> str:
        """The subspace dimension in words, for :meth:`describe_state`."""
        return f"rank {group['rank']}"

    def describe_state(self, group: dict, projector: Projector | None) -> str:
        return (f"projected m x n matrix (oriented so n is the projected side, proj_type={group['proj_type']!r}): "
                f"moments of m x {self.describe_rank(group)}, projector ({projector.name}) holds "
                f"{projector.describe_state()}")
