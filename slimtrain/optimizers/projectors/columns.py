"""Random coordinate (column) subsets: FRUGAL's coordinate selection. Only indices are stored."""

from __future__ import annotations

import torch
from torch import Tensor

from ..state import Slot, projector_slot
from .base import Projector


class ColumnsProjector(Projector):
    """Selects ``r`` of the ``n`` coordinates uniformly at random at each refresh.

    The basis is rows of the identity, so projecting is ``index_select`` and projecting back is a
    scatter: no matmul and no floating-point basis at all.
    """

    name = "columns"
    reads_gradient = False

    def state_spec(self, rank: int, n: int) -> list[Slot]:
        return [*super().state_spec(rank, n), projector_slot("proj_idx", (rank,), torch.int64)]

    def describe_state(self) -> str:
        return "r int64 indices"

    def refresh(self, grad_t: Tensor, state: dict, rank: int, *, transposed: bool) -> None:
        k = self._bump(state)
        gen = self._generator(state, k, torch.device("cpu"))
        idx = torch.randperm(grad_t.shape[1], generator=gen)[:rank].sort().values
        state["proj_idx"] = idx.to(grad_t.device)

    def basis(self, state: dict, n: int, device: torch.device) -> Tensor:
        idx = state["proj_idx"]
        return torch.zeros(idx.numel(), n, device=device).scatter_(1, idx.view(-1, 1).to(device), 1.0)

    def dense_basis(self, state: dict, n: int, device: torch.device) -> None:
        return None  # an identity-rows matmul would cost m*r*n flops for what a gather does

    def project(self, grad_t: Tensor, state: dict) -> Tensor:
        return grad_t.index_select(1, state["proj_idx"])

    def project_back(self, low: Tensor, state: dict, n: int) -> Tensor:
        out = low.new_zeros(low.shape[0], n)
        return out.index_copy_(1, state["proj_idx"], low)
