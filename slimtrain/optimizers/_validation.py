"""Every check on user input for the optimizer family, in one place so messages never drift.

Each check raises ``ValueError`` naming the parameter, the value it got and what is allowed; a keyword
or param-group key that no optimizer understands is a ``TypeError``, as Python's own for an
unexpected keyword argument.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right")

_KERNELS = (
    "slimtrain picks its kernels itself (Triton on CUDA, torch elsewhere); force one with "
    "slimtrain.kernels.set_backend(...) or SLIMTRAIN_KERNELS"
)
# Keywords of torch.optim.AdamW and galore_torch.GaLoreAdamW that a drop-in replacement must take, with
# the values that mean what slimtrain does; any other value is refused rather than ignored. ``maximize``
# is not here: it is an option of every slimtrain optimizer.
DROP_IN_OPTIONS: dict[str, tuple[tuple, str]] = {
    "amsgrad": ((False,), "AMSGrad's running max of v is not implemented"),
    "capturable": ((False,), "the step counters live on the host, so a step cannot be captured in a CUDA graph"),
    "differentiable": ((False,), "the step runs under torch.no_grad()"),
    "foreach": ((None,), _KERNELS),
    "fused": ((None,), _KERNELS),
    "decoupled_weight_decay": ((True,), "weight decay is always decoupled, as in AdamW"),
    "correct_bias": ((True,), "Adam's bias correction is always on"),
    "no_deprecation_warning": ((False, True), ""),
}
# Param-group keys that torch itself writes (LR schedulers, named parameters).
TORCH_GROUP_KEYS = ("initial_lr", "param_names")
# Keys of other low-rank packages whose meaning slimtrain spells differently.
RENAMED = {"alpha": "'scale' (fira's 'alpha')", "proj": "'projector' (APOLLO's 'proj')"}
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


def _is_dtensor(p: torch.Tensor) -> bool:
    if type(p) is torch.Tensor or type(p) is torch.nn.Parameter or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def check_param(p: torch.Tensor) -> None:
    if _is_dtensor(p):
        raise RuntimeError(
            f"Unsupported parameter: a DTensor of shape {tuple(p.shape)} placed {tuple(p.placements)} (FSDP2's "
            "fully_shard or tensor parallelism). slimtrain optimizers project whole matrices and do not support "
            "DTensor parameters yet; shard with DeepSpeed ZeRO through slimtrain.sharding.initialize(...), or "
            "replicate with plain torch.nn.parallel.DistributedDataParallel"
        )
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


def check_drop_in_option(name: str, value) -> None:
    """A torch/galore-torch keyword (:data:`DROP_IN_OPTIONS`) is accepted only where it means what we do."""
    allowed, why = DROP_IN_OPTIONS[name]
    if not any(value is a for a in allowed):
        reason = f": {why}" if why else ""
        raise ValueError(f"Invalid {name}: {value!r} (expected {' or '.join(map(repr, allowed))}{reason})")


def refuse_unknown(owner: str, what: str, unknown: Iterable[str], known: Iterable[str], owners: Mapping[str, str]) -> None:
    """``TypeError`` naming every key in ``unknown`` (``what``: "keyword argument" or "param group key"),
    with the likely intended spelling or the class that does take it (``owners``: key -> class name)."""
    unknown = sorted(unknown)
    if not unknown:
        return
    known = sorted(known)
    notes = []
    for key in unknown:
        if key in owners:
            notes.append(f"{key!r} is an option of {owners[key]}")
        elif key in RENAMED:
            notes.append(f"for {key!r} use {RENAMED[key]}")
        else:
            close = difflib.get_close_matches(key, known + sorted(owners), n=1, cutoff=0.75)
            if close:
                where = f", an option of {owners[close[0]]}" if close[0] in owners else ""
                notes.append(f"{key!r}: did you mean {close[0]!r}{where}?")
    s = "s" if len(unknown) > 1 else ""
    hint = f" ({'; '.join(notes)})" if notes else f" (accepted: {', '.join(known)})"
    raise TypeError(f"{owner} got unexpected {what}{s} {', '.join(map(repr, unknown))}{hint}")
