"""The optimizer family's input tables and the checks only optimizers need.

The generic checks (``check_lr``, ``check_int``, ``check_choice``, ...) are defined once, for optimizers and
adapters alike, in :mod:`slimtrain._validation`, and re-exported here so the optimizer family imports its
checks from one module.
Each raises ``ValueError`` naming the parameter, the value it got and what is allowed; a keyword or
param-group key that no optimizer understands is a ``TypeError``, as Python's own for an unexpected
keyword argument.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

import torch

from .._validation import (  # noqa: F401  (re-exported for the optimizer family)
    check_betas,
    check_bool,
    check_choice,
    check_int,
    check_int_choice,
    check_lr,
    check_nonneg,
    check_rank_for_shape,
    check_unit_interval,
)

PROJ_TYPES = ("std", "reverse_std", "left", "right")
STATE_BITS = (32, 8)
# The block sizes bitsandbytes' CUDA kernels accept; its CPU kernel takes any, but a checkpoint must
# resume on either device.
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)

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
RENAMED = {"alpha": "'scale' (fira's 'alpha')", "proj": "'projector' (APOLLO's 'proj')",
           "disable_nl": "gamma=None (apollo-torch's disable_nl=True)"}
MOMENT_POLICIES = ("keep", "reset", "rotate")
NONFINITE_POLICIES = ("skip", "raise")


def is_dtensor(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` (FSDP2's ``fully_shard`` parameters and their gradients)."""
    if type(p) is torch.Tensor or type(p) is torch.nn.Parameter or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _dtensor(p: torch.Tensor) -> str:
    return f"a DTensor of shape {tuple(p.shape)} placed {tuple(p.placements)}"


def check_param(p: torch.Tensor) -> None:
    if p.is_complex():
        raise ValueError(f"Invalid parameter: complex dtype {p.dtype} is not supported (use real parameters)")
    if not p.is_floating_point():
        raise ValueError(f"Invalid parameter: dtype {p.dtype} is not a floating-point type")


def refuse_swapped_param(p: torch.Tensor, why: str = "") -> None:
    """Raise for a tensor in the param groups that the optimizer was not built with and cannot take (``why``: for a
    ``DTensor``, the reason), naming what put it there and what to do."""
    if is_dtensor(p):
        raise RuntimeError(
            f"This optimizer is stepping {_dtensor(p)} that was swapped in after it was built (FSDP2's fully_shard "
            "applied to the model after the optimizer was constructed, as Accelerate does), and cannot take it: "
            f"{why}. "
            "Build the optimizer after fully_shard(...) (the Hugging Face Trainer does), or swap the parameters before "
            "its first step"
        )
    raise RuntimeError(
        f"This optimizer is stepping a tensor of shape {tuple(p.shape)} that it was not built with. DeepSpeed ZeRO "
        "(stage >= 1) does this: it replaces an optimizer's parameters by flat partitions, where matrices cannot "
        "be projected; build the engine with slimtrain.sharding.initialize(model=..., optimizer=..., config=...) "
        "instead. Otherwise build the optimizer on the parameters it steps."
    )


def check_grad(p: torch.Tensor) -> None:
    if p.grad.is_sparse:
        raise RuntimeError(
            "Sparse gradients are not supported by slimtrain optimizers "
            "(use torch.optim.SparseAdam or a dense embedding)"
        )


def check_drop_in_option(name: str, value) -> None:
    """A torch/galore-torch keyword (:data:`DROP_IN_OPTIONS`) is accepted only where it means what slimtrain does."""
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


def check_group(group: dict) -> None:
    """The checks every slimtrain optimizer makes of a param group's shared settings (the method's own are its
    rule's, :meth:`StepRule.validate_group <slimtrain.optimizers.rule.StepRule.validate_group>`; ``projector``
    and ``moments`` are the optimizer's, which knows whether its rule uses them)."""
    check_lr(group["lr"])
    betas = group["betas"]
    if isinstance(betas, (list, tuple)) and any(isinstance(b, torch.Tensor) for b in betas):
        # torch.optim takes them for CUDA-graph-captured steps; ours read them as numbers on the host.
        raise ValueError(f"Invalid betas: {tuple(betas)!r} (expected two numbers; tensor betas are not supported)")
    check_betas(betas)
    check_nonneg("eps", group["eps"])
    check_nonneg("weight_decay", group["weight_decay"])
    check_int_choice("state_bits", group["state_bits"], STATE_BITS)
    check_int("min_8bit_size", group["min_8bit_size"], minimum=0)
    check_int_choice("block_size", group["block_size"], BLOCK_SIZES)
    check_bool("bf16_stochastic_round", group["bf16_stochastic_round"])
    check_bool("maximize", group["maximize"])
    for p in group["params"]:
        check_param(p)
    if "rank" not in group:
        return
    check_int("rank", group["rank"], minimum=1)
    check_int("update_proj_gap", group["update_proj_gap"], minimum=1)
    check_nonneg("scale", group["scale"])
    check_choice("proj_type", group["proj_type"], PROJ_TYPES)
