"""GaLore (Zhao et al., ICML 2024, arXiv:2403.03507): Adam on the gradient projected to rank r."""

from __future__ import annotations

from .base import LowRankAdamW
from .eight_bit import EightBitStates
from .registry import register_method


class GaLoreAdamW(LowRankAdamW):
    r"""GaLore: AdamW whose moments live in an r-dimensional subspace of each matrix's gradient.

    Use it for pre-training or full fine-tuning when Adam's two full-size moments don't fit: a
    projected ``m x n`` matrix keeps ``max(m, n) x r`` moments and an ``r x min(m, n)`` basis instead
    of ``2 m n`` floats. Put the attention and MLP weights in a group with ``rank`` (see
    :func:`~slimtrain.optimizers.low_rank_param_groups`); embeddings, norms and the output head are
    better left to plain AdamW (every official script does so).

    For each projected matrix, every ``update_proj_gap`` steps the basis ``B`` (r x n) is refreshed
    from the current gradient (top singular vectors by default), then each step

    .. math::
        R_t = G_t B^\top,\quad N_t = \mathrm{Adam}(R_t),\quad
        W_t = W_{t-1} - \eta_t\, \alpha\, N_t B

    with :math:`\eta_t` Adam's bias-corrected step size and :math:`\alpha` = ``scale`` (0.25 in the
    paper's pre-training runs, with lr 0.01 and rank 128-512). Moments are kept across refreshes,
    as in the paper.

    With ``eps=1e-6, decay_after_update=True`` and the SVD projector it reproduces
    ``galore_torch.GaLoreAdamW`` parameter for parameter (tested). Arguments are those of
    :class:`~slimtrain.optimizers.base.LowRankAdamW`.
    """

    default_projector = "svd"
    default_moments = "keep"


class GaLoreAdamW8bit(EightBitStates, GaLoreAdamW):
    """:class:`GaLoreAdamW` with 8-bit Adam moments (``state_bits=8``);
    see :class:`~slimtrain.optimizers.eight_bit.EightBitStates`."""


# The paper's pre-training setting: lr 0.01, scale 0.25, a refresh every 200 steps.
register_method("galore", GaLoreAdamW, GaLoreAdamW8bit, recipe=dict(lr=1e-2, update_proj_gap=200, scale=0.25))
