"""Applying a step to a weight: decoupled weight decay and bf16 stochastic rounding, in one place for every
rule, the plain AdamW path and the ZeRO slices (:class:`Update` is what a step rule returns)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._seeds import parameter_seed
from . import quantized as Q

if TYPE_CHECKING:  # pragma: no cover
    from .base import LowRankAdamW


class Update:
    """One projected matrix's step, computed but not yet applied (see the module docstring)."""

    def apply_(self, opt: LowRankAdamW, p: Tensor, group: dict) -> None:
        """Move the parameter ``p`` in place, weight decay included."""
        raise NotImplementedError

    def materialize(self) -> Tensor:
        """The step as an ``m x n`` tensor in weight units: the caller subtracts it (or its slices) with the
        group's weight decay (:meth:`LowRankAdamW.apply_update_`)."""
        raise NotImplementedError


@dataclass
class DenseUpdate(Update):
    """``p <- p - step_size * direction`` (``direction`` in the matrix's ``m x n`` shape), or nothing at all
    when ``direction`` is ``None`` (a state-free rule that discards the gradient: the weight, weight decay
    included, is left alone in one process; a ZeRO owner sends zeros, which its ranks still decay)."""

    direction: Tensor | None
    step_size: float = 1.0

    def apply_(self, opt: LowRankAdamW, p: Tensor, group: dict) -> None:
        if self.direction is not None:
            apply_(opt, p, group, self.direction.reshape(p.shape), self.step_size)

    def materialize(self) -> Tensor:
        if self.direction is None:
            raise RuntimeError("an update that moves nothing has no tensor")  # matrix_update handles it
        return self.direction * self.step_size



def group_lr(group: dict) -> float:
    """The group's learning rate as a Python number, read at every step. torch.optim takes a 1-element tensor of
    any shape as ``lr`` (which LR schedulers then update in place with ``fill_``); the arithmetic here and the
    kernels' scalar arguments want a number."""
    lr = group["lr"]
    return lr.item() if isinstance(lr, Tensor) else lr


def decay_factors(group: dict) -> tuple[float, float]:
    """Decoupled weight decay as (factor before the update, factor after it)."""
    if not group["weight_decay"]:
        return 1.0, 1.0
    decay = 1.0 - group_lr(group) * group["weight_decay"]
    return (1.0, decay) if group["decay_after_update"] else (decay, 1.0)


def rounds_stochastically(p: Tensor, group: dict) -> bool:
    return p.dtype == torch.bfloat16 and group["bf16_stochastic_round"]


def apply_(opt: LowRankAdamW, p: Tensor, group: dict, update: Tensor, step_size: float) -> None:
    """``p <- p - step_size * update`` with decoupled weight decay, computed in fp32 (and rounded
    stochastically to a bf16 ``p`` when the group's ``bf16_stochastic_round`` is on, from ``p``'s own
    rounding stream in ``opt.state[p]``)."""
    before, after = decay_factors(group)
    target = p if p.dtype == torch.float32 else p.float()
    if before != 1.0:
        target.mul_(before)
    target.add_(update, alpha=-step_size)
    if after != 1.0:
        target.mul_(after)
    if target is not p and rounds_stochastically(p, group):
        if p not in opt.state:
            raise RuntimeError(
                "bf16_stochastic_round needs the parameter's own state (its rounding seed and counter), but "
                f"this tensor of shape {tuple(p.shape)} is not a parameter of the optimizer (a ZeRO shard?): "
                "turn bf16_stochastic_round off or keep fp32 master weights"
            )
        state = opt.state[p]
        seed = None if "sr_seed" in state else parameter_seed(opt.seed, opt._param_index(p))
        p.copy_(Q.bf16_stochastic_round(target, Q.rounding_generator(state, seed, p.device)))
    elif target is not p:
        p.copy_(target)
