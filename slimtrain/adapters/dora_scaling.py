"""DoRA's magnitude rescaling as free functions (Liu et al., ICML 2024, §4.3), used by every tuner layer that
takes ``use_dora`` (:class:`~slimtrain.adapters.delta_layer.DeltaLayer`)."""

from __future__ import annotations

import torch


def dora_row_norm(weight: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """‖W + ΔW‖ over each output row (W, ΔW of shape (out, in)), in fp32, detached (DoRA §4.3)."""
    with torch.no_grad():
        w = weight.float()
        if delta is not None:
            w = w + delta.float()
        return torch.linalg.vector_norm(w, dim=1)


def dora_scale(magnitude: torch.Tensor, row_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """g = m / ‖W + ΔW‖, and g = 1 on rows whose norm is <= eps.

    PEFT divides unguarded, so an all-zero weight row (511 of them in Llama-3.1-8B's o_proj, PEFT issue
    #2049) gives m / 0 = 0 / 0 = NaN. For such a row the direction is undefined; g = 1 makes the row behave
    like plain (un-normalized) W + ΔW, which is finite, exact at init (both are 0) and invertible on unmerge.
    """
    m = magnitude.float()
    safe = row_norm > eps
    return torch.where(safe, m / torch.where(safe, row_norm, torch.ones_like(row_norm)), torch.ones_like(m))
