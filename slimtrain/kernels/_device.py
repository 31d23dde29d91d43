"""Device identity for the kernels' checks: the one place that decides whether two devices are the same.

``torch.device("cuda")`` names the *current* CUDA device while a tensor's ``.device`` always carries an
index (``cuda:0``), so ``==`` calls them different. Every check in ``slimtrain.kernels`` compares through
:func:`canonical` instead, and every launcher refuses operands on different devices with an error
naming the operand (a Triton kernel given one would read or write the wrong memory, not fail).
"""

from __future__ import annotations

import torch
from torch import Tensor


def canonical(device: torch.device | str) -> torch.device:
    """``device`` with the index of the device it names: ``cuda`` -> ``cuda:<current>``; others as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return torch.device("cuda", index)
    return device


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether ``a`` and ``b`` name the same device (``cuda`` and ``cuda:0`` do, when 0 is current)."""
    return canonical(a) == canonical(b)


def check_same_device(op: str, lead: str, tensors: dict[str, Tensor | None]) -> torch.device:
    """Return the device of ``tensors[lead]``; raise ``ValueError`` naming any other tensor that is elsewhere.

    ``None`` entries (absent optional operands) are skipped.
    """
    device = tensors[lead].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(
                f"Invalid {name}: on {t.device} (expected {device}, the device of {lead}: {op} runs where its "
                "operands are and never moves them)"
            )
    return device
