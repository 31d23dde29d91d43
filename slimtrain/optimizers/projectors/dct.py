"""SVD-free projection (Modoranu et al., arXiv:2505.17967): a fixed orthonormal DCT-II basis, of which
the ``r`` columns best aligned with the gradient are kept. Only their indices are stored.

Scoring a refresh is one DCT of every row of the oriented gradient, ``S = G' @ C.T`` with ``C`` the
n x n orthonormal DCT-II matrix, followed by a top-r over per-column norms of ``S``. Two backends:

- ``"fft"`` (default): Makhoul's algorithm, one length-n FFT per row, O(m n log n); no n x n matrix
  is ever built.
- ``"matmul"``: ``G' @ C.T`` with ``C`` built once per distinct (n, device) and shared by all
  layers, reduced to the scores tile by tile without storing the product
  (:func:`slimtrain.kernels.dct_scores.dct_scores`, a Triton kernel on CUDA). Faster on GPUs for
  moderate n; costs n^2 floats per distinct dimension.

The ``r`` selected basis rows are computed in closed form when needed (O(r n) cosines), so the
optimizer state for a matrix is ``r`` int64 indices.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...kernels._device import canonical
from ...kernels.dct_scores import dct_scores
from .._validation import check_choice
from ..state import Slot, projector_slot
from .base import Projector

_DENSE_CACHE: dict[tuple[int, str], Tensor] = {}


def dct_rows(idx: Tensor, n: int, device: torch.device) -> Tensor:
    """Rows ``idx`` of the orthonormal n x n DCT-II matrix: ``C[k, j] = c_k cos(pi k (2j+1) / 2n)``.

    The phase ``k (2j+1)`` is reduced modulo ``4n`` in integer arithmetic first: for n = 11008 the
    raw fp32 angle would carry ~1e-3 rad of rounding error, the reduced one ~1e-7.
    """
    k = idx.to(device=device, dtype=torch.int64).view(-1, 1)
    j = torch.arange(n, device=device, dtype=torch.int64).view(1, -1)
    phase = (k * (2 * j + 1)) % (4 * n)
    rows = torch.cos(phase.to(torch.float64) * (math.pi / (2 * n))).to(torch.float32)
    scale = torch.full((k.shape[0], 1), math.sqrt(2.0 / n), device=device)
    scale[k.view(-1) == 0] = math.sqrt(1.0 / n)
    return rows * scale


def dct_matrix(n: int, device: torch.device) -> Tensor:
    """The orthonormal n x n DCT-II matrix, built once per (n, device) and shared by all layers (``cuda`` and
    ``cuda:0`` are one device, so one copy)."""
    key = (n, str(canonical(device)))
    if key not in _DENSE_CACHE:
        _DENSE_CACHE[key] = dct_rows(torch.arange(n), n, device)
    return _DENSE_CACHE[key]


def dct_ii(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along the last dimension through one FFT (Makhoul 1980).

    Reorder ``v = [x0, x2, x4, ..., x5, x3, x1]``; then ``X_k = Re(exp(-i pi k / 2n) FFT(v)_k)``.
    """
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    spectrum = torch.fft.fft(v, dim=-1)
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    out = (spectrum * twiddle).real * math.sqrt(2.0 / n)
    out[..., 0] *= math.sqrt(0.5)
    return out


class DCTProjector(Projector):
    """Top-``r`` DCT-II directions by alignment with the gradient.

    Args:
        norm: ``1`` (default, as the reference code) or ``2``: the norm over rows used to score each
            DCT column.
        backend: ``"fft"`` (default) or ``"matmul"``; see the module docstring.
    """

    name = "dct"

    def __init__(self, norm: int = 1, backend: str = "fft"):
        check_choice("norm", norm, (1, 2))
        check_choice("backend", backend, ("fft", "matmul"))
        self.norm = norm
        self.backend = backend

    def state_spec(self, rank: int, n: int) -> list[Slot]:
        return [*super().state_spec(rank, n), projector_slot("proj_idx", (rank,), torch.int64)]

    def describe_state(self) -> str:
        return "r int64 indices"

    scores_by_column = True

    def scores(self, grad_t: Tensor) -> Tensor:
        if self.backend == "matmul":
            return dct_scores(grad_t, dct_matrix(grad_t.shape[1], grad_t.device), self.norm)
        s = dct_ii(grad_t)
        return s.abs().sum(0) if self.norm == 1 else s.square().sum(0)

    def column_scores(self, grad_t: Tensor) -> Tensor:
        return self.scores(grad_t)

    def refresh(self, grad_t: Tensor, state: dict, rank: int, *, transposed: bool) -> None:
        self.refresh_from_scores(self.scores(grad_t), state, rank)

    def refresh_from_scores(self, scores: Tensor, state: dict, rank: int) -> None:
        self._bump(state)
        state["proj_idx"] = torch.topk(scores, rank, sorted=False).indices.sort().values

    def basis(self, state: dict, n: int, device: torch.device) -> Tensor:
        if self.backend == "matmul":
            return dct_matrix(n, device).index_select(0, state["proj_idx"].to(device))
        return dct_rows(state["proj_idx"], n, device)
