"""Randomized range finder with power iterations (Halko, Martinsson & Tropp 2011), warm-startable."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_bool, check_int
from .base import StoredBasisProjector


class RandomizedProjector(StoredBasisProjector):
    """Approximate top-``r`` right singular subspace in O(m n (r + oversample)) per refresh.

    Args:
        oversample: extra random directions beyond ``r`` (default 8).
        niter: power iterations; each sharpens the spectrum gap at the cost of two more passes over G
            (default 1).
        warm_start: start from the previous basis instead of a fresh Gaussian sketch. With a slowly
            rotating gradient subspace (the premise of GaLore) one warm power step tracks it well
            (LDAdam, Dion use the same idea).
        basis_dtype: ``"fp32"`` (default) or ``"bf16"``: how the ``r x n`` basis is stored (see
            :data:`~slimtrain.optimizers.projectors.base.BASIS_DTYPES`).
    """

    name = "randomized"

    def __init__(self, oversample: int = 8, niter: int = 1, warm_start: bool = True, basis_dtype: str = "fp32"):
        check_int("oversample", oversample, minimum=0)
        check_int("niter", niter, minimum=0)
        check_bool("warm_start", warm_start)
        super().__init__(basis_dtype)
        self.oversample = oversample
        self.niter = niter
        self.warm_start = warm_start

    def refresh(self, grad_t: Tensor, state: dict, rank: int, *, transposed: bool) -> None:
        k_refresh = self._bump(state)
        m, n = grad_t.shape
        k = min(rank + self.oversample, n)
        gen = self._generator(state, k_refresh, grad_t.device)
        omega = torch.randn(n, k, generator=gen, device=grad_t.device, dtype=grad_t.dtype)
        if self.warm_start and k_refresh > 0:  # the first refresh (again, after a gradient of zeros) starts cold
            omega[:, :rank] = state["proj_basis"].T
        y = grad_t @ omega
        for _ in range(self.niter):
            q, _ = torch.linalg.qr(y)
            y = grad_t @ (grad_t.T @ q)
        q, _ = torch.linalg.qr(y)
        _, _, vh = torch.linalg.svd(q.T @ grad_t, full_matrices=False)
        self._store_basis(state, vh[:rank])
