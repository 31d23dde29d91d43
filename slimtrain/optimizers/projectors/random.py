"""Seeded Gaussian projection (APOLLO-style): the state is a seed, never a matrix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..state import Slot, counter
from .base import Projector


class RandomProjector(Projector):
    """A fresh Gaussian ``r x n`` basis at each refresh, regenerated from its seed at every step.

    Entries are N(0, 1/n), so rows have unit norm in expectation and are nearly orthogonal when
    ``n >> r`` (Johnson-Lindenstrauss); ``low @ B`` is then close to an orthogonal projection.
    Regenerating costs r*n random numbers per step, small next to the m*n*r projection matmul, and
    saves the r*n floats per matrix that an SVD projector keeps. Bases depend on the device's
    generator: a run resumed on the same device type reproduces exactly.
    """

    name = "random"
    reads_gradient = False

    def state_spec(self, rank: int, n: int) -> list[Slot]:
        return [*super().state_spec(rank, n), counter("proj_rank")]

    def describe_state(self) -> str:
        return "a seed (basis regenerated)"

    def refresh(self, grad_t: Tensor, state: dict, rank: int, *, transposed: bool) -> None:
        self._bump(state)
        state["proj_rank"] = torch.tensor(rank, dtype=torch.int64)

    def basis(self, state: dict, n: int, device: torch.device) -> Tensor:
        k = int(state["proj_refreshes"]) - 1
        gen = self._generator(state, k, device)
        rank = int(state["proj_rank"])
        return torch.randn(rank, n, generator=gen, device=device) / math.sqrt(n)
