"""Every check on user input for the optimizer family, in one place so messages never drift.

Each check raises ``ValueError`` naming the parameter, the value it got and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right")
MOMENT_POLICIES = ("keep", "reset", "rotate")
NONFINITE_POLICIES = ("skip", "raise")


def check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: tensor of shape {tuple(lr.shape)} (expected a scalar)")
        lr = lr.item()
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid lr: {lr} (expected a finite number >= 0)")


def check_betas(betas) -> None:
    if not (isinstance(betas, Sequence) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for i, b in enumerate(betas):
        if not (isinstance(b, (int, float)) and 0.0 <= b < 1.0):
            raise ValueError(f"Invalid beta{i + 1}: {b} (expected 0 <= beta{i + 1} < 1)")


def check_nonneg(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {name}: {value} (expected a finite number >= 0)")


def check_positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0.0):
        raise ValueError(f"Invalid {name}: {value} (expected a finite number > 0)")


def check_unit_interval(name: str, value, *, open_low: bool = False) -> None:
    low_ok = value > 0.0 if open_low else value >= 0.0
    if not (isinstance(value, (int, float)) and low_ok and value <= 1.0):
        allowed = "0 < {0} <= 1" if open_low else "0 <= {0} <= 1"
        raise ValueError(f"Invalid {name}: {value} (expected {allowed.format(name)})")


def check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {minimum})")


def check_int_choice(name: str, value, allowed: Iterable[int]) -> None:
    allowed = tuple(allowed)
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(str, allowed))})")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")


def check_choice(name: str, value, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, allowed))})")


def check_rank_for_shape(rank: int, shape: torch.Size, name: str = "rank") -> None:
    limit = min(shape)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"Invalid {name}: {rank} (expected 1 <= {name} <= {limit} for parameter of shape {tuple(shape)})"
        )


def check_param(p: torch.Tensor) -> None:
    if p.is_complex():
        raise ValueError(f"Invalid parameter: complex dtype {p.dtype} is not supported (use real parameters)")
    if not p.is_floating_point():
        raise ValueError(f"Invalid parameter: dtype {p.dtype} is not a floating-point type")


def check_grad(p: torch.Tensor) -> None:
    if p.grad.is_sparse:
        raise RuntimeError(
            "Sparse gradients are not supported by slimtrain optimizers "
            "(use torch.optim.SparseAdam or a dense embedding)"
        )
