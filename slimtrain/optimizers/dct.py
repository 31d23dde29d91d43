"""The SVD-free low-rank optimizer (Modoranu et al., arXiv:2505.17967): GaLore's step with a fixed DCT
basis whose columns are picked by their alignment with the gradient."""

from __future__ import annotations

from .base import LowRankAdamW
from .eight_bit import EightBitStates
from .registry import register_method


class DCTAdamW(LowRankAdamW):
    r"""Low-rank AdamW without any SVD: the subspace is ``r`` rows of the orthonormal DCT-II basis.

    At each refresh the gradient's rows are transformed by the DCT (one FFT per row, or one matmul
    with a basis shared by every layer of the same width) and the ``r`` frequencies with the largest
    column norms are kept. The optimizer stores ``r`` integer indices per matrix instead of an
    ``r x n`` float basis, and a refresh costs O(m n log n) instead of an SVD's O(m n min(m, n)).

    Moments default to ``"rotate"``: for two DCT selections this keeps the moments of the frequencies
    both share and starts the new ones at zero, instead of reinterpreting old coordinates as new
    directions. Arguments are those of :class:`~slimtrain.optimizers.base.LowRankAdamW`; pass
    ``projector=DCTProjector(norm=2, backend="matmul")`` to change scoring or backend.
    """

    default_projector = "dct"
    default_moments = "rotate"


class DCTAdamW8bit(EightBitStates, DCTAdamW):
    """:class:`DCTAdamW` with 8-bit Adam moments (``state_bits=8``);
    see :class:`~slimtrain.optimizers.eight_bit.EightBitStates`."""


# GaLore's pre-training setting (the method's code has no defaults for lr and scale).
register_method("dct", DCTAdamW, DCTAdamW8bit, recipe=dict(lr=1e-2, update_proj_gap=200, scale=0.25))
