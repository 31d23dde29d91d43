"""APOLLO (Zhu et al., MLSys 2025, arXiv:2412.05270): Adam's moments for a random projection of each matrix's
gradient, used only to scale the raw, full-rank gradient channel by channel (or, APOLLO-Mini, as a whole)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._validation import check_bool, check_choice
from .base import LowRankAdamW
from .eight_bit import EightBitStates
from .functional import APOLLO_SCALE_TYPES, adam_step_size, apollo_row_scale
from .lowrank import LowRankRule
from .projectors import Projector
from .registry import register_method
from .rule import MatrixContext
from .state import Slot
from .updates import RoundingStream, Update, apply_, group_lr

#: The state key of the limiter's memory: the norm of the previous step's scaled gradient, after limiting.
LIMITER_NORM = "scaled_grad_norm"


def check_apollo_options(scale_type, scale_front, gamma) -> None:
    """APOLLO's own options (``ValueError`` naming the first that is invalid)."""
    check_choice("scale_type", scale_type, APOLLO_SCALE_TYPES)
    check_bool("scale_front", scale_front)
    if gamma is not None and not (isinstance(gamma, (int, float)) and not isinstance(gamma, bool)
                                  and math.isfinite(gamma) and gamma >= 1.0):
        raise ValueError(f"Invalid gamma: {gamma!r} (expected a number >= 1, or None for no norm-growth limiter)")


def _at_most_fp32(t: Tensor) -> Tensor:
    """``t`` itself if its dtype has at most fp32's precision (computed with in fp32 without a copy), else fp32."""
    return t if t.dtype.itemsize <= 4 else t.float()


@dataclass
class ScaledGradientStep(Update):
    """``p <- p - step_size * s * G``: the raw gradient scaled per channel (a row of the oriented frame) or as a
    whole. The update is materialized once (an ``m x n`` fp32 tensor, as apollo-torch's ``scaled_grad``) and
    applied through :func:`~slimtrain.optimizers.updates.apply_`, so one process, layer-wise steps and a ZeRO
    owner do the same arithmetic."""

    grad_t: Tensor  # G' (m' x n'), any float dtype, possibly a transposed view
    row_scale: Tensor  # s: (m',) per channel, or a 0-d tensor for the whole tensor; fp32, before the step size
    step_size: float  # Adam's bias-corrected lr
    transposed: bool

    def materialize(self) -> Tensor:
        # A 1 x 1 or m' x 1 fp32 factor makes the product of a half-precision gradient fp32 in one allocation.
        scale = self.row_scale.view(-1, 1) * self.step_size
        update = _at_most_fp32(self.grad_t) * scale
        return update.T if self.transposed else update

    def apply_(self, p: Tensor, group: dict, rounding: RoundingStream | None) -> None:
        apply_(p, group, self.materialize().reshape(p.shape), 1.0, rounding)


class APOLLORule(LowRankRule):
    """APOLLO's step: GaLore's refresh, projection and Adam (through :class:`LowRankRule`), with the projection
    scaled to preserve norms, then the raw gradient scaled by :func:`~slimtrain.optimizers.functional.apollo_row_scale`
    instead of a step in the subspace. The limiter's previous norm is the one piece of state beyond GaLore's.

    What a sharded driver needs per step: ``R = G' B^T`` (row-local when the projection contracts the unsharded
    side), Adam on ``R``'s rows, the channel norms of ``R`` and ``N`` (row-local), and sums over rows for the
    tensor-wise norms and the limiter's norm (scalar all-reduces: ``apollo_row_scale(sum_rows=...)``)."""

    name = "apollo"
    options = ("scale_type", "scale_front", "gamma")

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        check_apollo_options(group["scale_type"], group["scale_front"], group["gamma"])

    def project(self, frame, grad_t: Tensor, basis: Tensor | None, projector: Projector, state: dict) -> Tensor:
        # Our projectors' rows have unit norm (exactly, or in expectation for the Gaussian one). APOLLO's projection
        # has N(0, 1/r) entries, so that E|G'_i B^T|^2 = |G'_i|^2 (Johnson-Lindenstrauss): sqrt(n'/r) times ours.
        # The scaling factors divide by |R_i|, so this sets the update's size; apollo-torch's scale of 1 at rank
        # 256 and 128 at rank 1 assume it. n' is the whole matrix's, whichever part of it this process holds.
        low = super().project(frame, grad_t, basis, projector, state)
        return low.mul_(math.sqrt(frame.shape[1] / low.shape[1]))

    def update(self, p: Tensor, grad: Tensor, group: dict, state: dict, ctx: MatrixContext) -> ScaledGradientStep:
        sub = super().update(p, grad, group, state, ctx)  # refresh, project, Adam: R and N, nothing applied
        beta1, beta2 = group["betas"]
        step_size = adam_step_size(group_lr(group), beta1, beta2, int(state["step"]))
        gamma = group["gamma"]
        frame = sub.frame  # sums over the rows or columns of G' that other ranks hold (FSDP2), else nothing
        row_sq = None
        if gamma is not None:  # the limiter's norm from the gradient's row norms (no m x n temporary)
            row_sq = frame.sum_cols(
                torch.linalg.vector_norm(_at_most_fp32(sub.grad_t), dim=1, dtype=torch.float32).square())
        row_scale, norm = apollo_row_scale(sub.low, sub.direction, row_sq, state.get(LIMITER_NORM),
                                           scale_type=group["scale_type"], scale=group["scale"],
                                           scale_front=group["scale_front"], gamma=gamma, sum_rows=frame.sum_rows)
        if norm is not None:
            state[LIMITER_NORM] = norm
        return ScaledGradientStep(sub.grad_t, row_scale, step_size, sub.transposed)

    def residual_slots(self, group: dict) -> list[Slot]:
        return [Slot(LIMITER_NORM, (), torch.float32)] if group["gamma"] is not None else []

    def describe_state(self, group: dict, projector: Projector | None) -> str:
        limiter = ", and the limiter's previous norm (one fp32 scalar)" if group["gamma"] is not None else ""
        return (f"projected m x n matrix (oriented so n is the projected side, proj_type={group['proj_type']!r}): "
                f"Adam moments of m x rank {group['rank']} ({group['scale_type']}-wise scaling of the raw gradient), "
                f"projector ({projector.name}) holds {projector.describe_state()}{limiter}")


class APOLLOMiniRule(APOLLORule):
    """APOLLO-Mini: :class:`APOLLORule` at rank 1 with one scaling factor for the whole tensor."""

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        if group["rank"] != 1 or group["scale_type"] != "tensor":
            raise ValueError(
                f"Invalid rank/scale_type: {group['rank']!r}/{group['scale_type']!r} (APOLLOMiniAdamW is APOLLO at "
                "rank 1 with scale_type='tensor': build its groups with low_rank_param_groups(model, rank=1, "
                "scale=128), or use APOLLOAdamW for another rank or channel-wise scaling)"
            )


class APOLLOAdamW(LowRankAdamW):
    r"""APOLLO: AdamW-like training at nearly SGD's memory, without any SVD.

    Element-wise Adam is, per channel, mostly a rescaling of the gradient. APOLLO keeps Adam's moments only for
    a random projection of each matrix's gradient to rank ``r`` (seeded Gaussian, refreshed every
    ``update_proj_gap`` steps; the state is its seed) and uses them to estimate that rescaling, channel by
    channel, then scales the raw, full-rank gradient by it. Put the attention and MLP weights in a group with
    ``rank`` (:func:`~slimtrain.optimizers.low_rank_param_groups`); the rest gets plain AdamW. For each projected
    matrix, in the oriented frame of ``projectors/base.py`` (``m' x n'``, the projection contracts ``n'``):

    .. math::
        R_t = G_t P^\top,\ P_{ij} \sim \mathcal{N}(0, 1/r),\quad N_t = \mathrm{Adam}(R_t),\quad
        s_i = \frac{\lVert N_{t,i}\rVert}{\lVert R_{t,i}\rVert + 10^{-8}},\quad
        W_t = W_{t-1} - \eta_t \sqrt{\alpha}\, \mathrm{limit}(s \odot G_t)

    with :math:`\eta_t` Adam's bias-corrected step size, :math:`\alpha` = ``scale`` (applied as its square root,
    apollo-torch's convention) and the limiter of Fira, :math:`\lVert S_t\rVert \le \gamma \lVert S_{t-1}\rVert`.
    The channels are the rows of the oriented frame, the side the projection keeps. State per matrix:
    ``2 max(m, n) r`` floats of moments, a seed, counters and the limiter's norm. The paper's pre-training
    setting: lr 0.01, rank 256 (128 at LLaMA-60M), ``scale=1``, T = 200.

    :class:`APOLLOMiniAdamW` is the rank-1, tensor-wise form. ``slimtrain.optimizers.APOLLOAdamW`` equals
    ``apollo_torch.APOLLOAdamW`` given the same projection, to 1e-6 after 50 steps and 5 refreshes, with
    ``eps=1e-6, decay_after_update=True`` (apollo-torch's eps and weight decay placement; tested). What differs by
    default, and why, is in ``docs/optimizers.md`` ("APOLLO").

    Args:
        scale_type: ``"channel"`` (default) or ``"tensor"``: one scaling factor per channel, or one per matrix.
        scale_front: apply :math:`\sqrt{\alpha}` before the limiter instead of after it (apollo-torch's
            ``scale_front``; the same update while ``scale`` stays constant). Default False.
        gamma: the limiter's growth bound (default 1.01, as Fira's and apollo-torch's); ``None`` turns the limiter
            off (apollo-torch's ``disable_nl=True``), and the state then keeps no norm.
        Other arguments: see :class:`~slimtrain.optimizers.base.LowRankAdamW`; the projector defaults to
            ``"random"`` and ``scale`` to 1. Any projector works: its basis is scaled by :math:`\sqrt{n'/r}`, which
            for ``"random"`` gives APOLLO's :math:`\mathcal{N}(0, 1/r)` entries.
    """

    default_projector = "random"
    default_moments = "keep"
    rule_type = APOLLORule

    def __init__(self, params, lr: float = 1e-3, *args, scale_type: str = "channel", scale_front: bool = False,
                 gamma: float | None = 1.01, **kwargs):
        check_apollo_options(scale_type, scale_front, gamma)
        super().__init__(params, lr, *args, scale_type=scale_type, scale_front=scale_front, gamma=gamma, **kwargs)


class APOLLOAdamW8bit(EightBitStates, APOLLOAdamW):
    """:class:`APOLLOAdamW` with 8-bit Adam moments (``state_bits=8``);
    see :class:`~slimtrain.optimizers.eight_bit.EightBitStates`."""


class APOLLOMiniAdamW(APOLLOAdamW):
    r"""APOLLO-Mini: APOLLO at rank 1 with one scaling factor per matrix, the least optimizer state of any
    adaptive method here: per projected matrix, two ``max(m, n)``-element moments, a seed and a few scalars.

    Its projected groups must have ``rank`` 1 (refused otherwise; :class:`APOLLOAdamW` takes any rank and either
    ``scale_type``). ``scale`` defaults to 128, the paper's for LLaMA-60M to 7B (its 130M run used 192, a quarter
    of the width): the update is multiplied by :math:`\sqrt{128} = 11.3`, which makes up for a rank-1 estimate
    of Adam's scaling. :func:`~slimtrain.optimizers.low_rank_param_groups` writes ``scale=0.25`` (GaLore's) into
    the group unless told otherwise, so build the groups as below. Arguments are :class:`APOLLOAdamW`'s, with
    ``scale_type="tensor"``::

        groups = low_rank_param_groups(model, ["attn", "mlp"], rank=1, scale=128)
        opt = APOLLOMiniAdamW(groups, lr=1e-2)
    """

    rule_type = APOLLOMiniRule

    def __init__(self, params, lr: float = 1e-3, *args, scale: float = 128.0, scale_type: str = "tensor", **kwargs):
        super().__init__(params, lr, *args, scale=scale, scale_type=scale_type, **kwargs)


class APOLLOMiniAdamW8bit(EightBitStates, APOLLOMiniAdamW):
    """:class:`APOLLOMiniAdamW` with 8-bit Adam moments (``state_bits=8``): a moment of ``max(m, n)`` elements is
    quantized where it has at least ``min_8bit_size`` (4096) of them."""


# The paper's pre-training setting (its scripts, apollo-torch's defaults): lr 0.01, scale 1, channel-wise, a
# refresh every 200 steps. APOLLO-Mini: rank 1, tensor-wise, scale 128.
register_method("apollo", APOLLOAdamW, APOLLOAdamW8bit, recipe=dict(lr=1e-2, update_proj_gap=200, scale=1.0),
                variants={"mini": dict(rank=1, scale=128.0, scale_type="tensor")})
