"""Applying a step to a weight: decoupled weight decay and bf16 stochastic rounding, in one place for every
rule, the plain AdamW path and the ZeRO slices (:class:`Update` is what a step rule returns).

**bf16 stochastic rounding** (:func:`bf16_stochastic_round`, as torchao's ``bf16_stochastic_round``): a bf16
weight near 1 has a spacing of 2^-8 ~ 3.9e-3, so an update of 1e-4 rounds away to nothing every step and
pure-bf16 training stalls. Rounding up with probability equal to the discarded fraction makes the expected
weight equal to the fp32 result. Each parameter draws from its own stream (:class:`RoundingStream`), so the
global RNG is untouched and a resumed run draws the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._seeds import generator, rounding_stream_seed


@dataclass(frozen=True)
class RoundingStream:
    """A parameter's stochastic-rounding draws: its ``sr_seed`` (created from ``seed`` at the first rounding) and
    ``sr_step`` (counted here) in its optimizer state ``state``. Reproducible on resume, independent of the
    global RNG and of the projectors' streams (:func:`slimtrain._seeds.rounding_stream_seed`)."""

    state: dict
    seed: int

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator for one rounding (the next in the stream)."""
        state = self.state
        if "sr_seed" not in state:
            state["sr_seed"] = torch.tensor(self.seed, dtype=torch.int64)
            state["sr_step"] = torch.zeros((), dtype=torch.int64)
        state["sr_step"] += 1
        return generator(rounding_stream_seed(int(state["sr_seed"]), int(state["sr_step"])), device)


class Update:
    """One projected matrix's step, computed but not yet applied (see the module docstring)."""

    def apply_(self, p: Tensor, group: dict, rounding: RoundingStream | None) -> None:
        """Move the parameter ``p`` in place, weight decay included; ``rounding`` is ``p``'s stream where its
        updates are rounded stochastically (:func:`rounds_stochastically`), else ``None``."""
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

    def apply_(self, p: Tensor, group: dict, rounding: RoundingStream | None) -> None:
        if self.direction is not None:
            apply_(p, group, self.direction.reshape(p.shape), self.step_size, rounding)

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


def apply_(p: Tensor, group: dict, update: Tensor, step_size: float, rounding: RoundingStream | None) -> None:
    """``p <- p - step_size * update`` with decoupled weight decay, computed in fp32 (and rounded
    stochastically to a bf16 ``p`` from ``rounding`` when the group's ``bf16_stochastic_round`` is on)."""
    before, after = decay_factors(group)
    target = p if p.dtype == torch.float32 else p.float()
    if before != 1.0:
        target.mul_(before)
    target.add_(update, alpha=-step_size)
    if after != 1.0:
        target.mul_(after)
    if target is not p and rounds_stochastically(p, group):
        if rounding is None:
            raise RuntimeError(
                "bf16_stochastic_round needs the parameter's own state (its rounding seed and counter), but "
                f"this tensor of shape {tuple(p.shape)} is not a parameter of the optimizer (a ZeRO shard?): "
                "turn bf16_stochastic_round off or keep fp32 master weights"
            )
        p.copy_(bf16_stochastic_round(target, rounding.generator(p.device)))
    elif target is not p:
        p.copy_(target)


def bf16_stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round an fp32 tensor to bf16, up with probability equal to the discarded fraction.

    bf16 is fp32 with the low 16 mantissa bits dropped. Adding 16 uniform random bits below the kept
    mantissa and truncating rounds the magnitude up with probability (dropped bits) / 2^16, so
    ``E[round(x)] = x`` for every finite ``x`` (signs are handled by the sign-magnitude layout; a carry
    into the exponent is the correct next bf16 value). ``generator`` (on ``x``'s device) keeps the
    draw off the global RNG.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"Invalid tensor to round: dtype {x.dtype} (expected torch.float32)")
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = x.contiguous().view(torch.int32) + noise
    return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # -65536 == 0xFFFF0000
