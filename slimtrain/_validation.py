"""Every generic check on user input, for optimizers and adapters alike, in one place so messages never drift.

Each check raises ``ValueError`` in one format, ``Invalid <name>: <value> (expected <what is allowed>)``, and
returns the value it accepted. The optimizer family's own tables and checks (drop-in keywords, unknown
param-group keys, DTensor parameters) are in :mod:`slimtrain.optimizers._validation`, which re-exports these
for its ``V.check_*`` call sites; the adapters' configs import them from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch


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


def check_unit_interval(name: str, value, *, open_low: bool = False) -> None:
    low_ok = value > 0.0 if open_low else value >= 0.0
    if not (isinstance(value, (int, float)) and low_ok and value <= 1.0):
        allowed = "0 < {0} <= 1" if open_low else "0 <= {0} <= 1"
        raise ValueError(f"Invalid {name}: {value} (expected {allowed.format(name)})")


def check_float(name: str, value: Any, low: float, high: float, *, high_open: bool = False) -> float:
    """A finite real number (``bool`` refused) in ``[low, high]`` (``[low, high)`` with ``high_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"Invalid {name}: {value!r} (expected a float in [{low}, {high}{bracket})")
    return float(value)


def check_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """An ``int`` (``bool`` refused) in ``[minimum, maximum]`` (no upper bound when ``maximum`` is None)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and value >= minimum and (maximum is None or value <= maximum)
    if not ok:
        allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"Invalid {name}: {value!r} (expected {allowed})")
    return value


def check_int_choice(name: str, value, allowed: Iterable[int]) -> int:
    allowed = tuple(allowed)
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(str, allowed))})")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")
    return value


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, allowed))})")
    return value


def check_rank_for_shape(rank: int, shape: torch.Size, name: str = "rank") -> None:
    limit = min(shape)
    if not 1 <= rank <= limit:
        raise ValueError(
            f"Invalid {name}: {rank} (expected 1 <= {name} <= {limit} for parameter of shape {tuple(shape)})"
        )


def check_target_modules(name: str, value: Any) -> None:
    """``target_modules`` (or ``exclude_modules``) must be None, a regex str, or a non-empty list/set of str."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) for v in value):
        return
    raise ValueError(
        f"Invalid {name}: {value!r} (expected None, a regex str, or a non-empty list of module-name suffixes)"
    )
