"""The declared layout of optimizer state: which keys a parameter's state holds, their shapes, dtypes,
whether they live on the host, and what each one is.

Every piece of the optimizer family that keeps per-parameter state declares it here, as a list of
:class:`Slot`: a step rule (:meth:`StepRule.state_spec <slimtrain.optimizers.rule.StepRule.state_spec>`),
a projector (:meth:`Projector.state_spec <slimtrain.optimizers.projectors.Projector.state_spec>`), Adam's
moments (:func:`moment_slots`, from which :func:`~slimtrain.optimizers.moments.init_moments` also creates
the tensors) and bf16 stochastic rounding (:func:`rounding_slots`). The readers use the declaration
instead of knowing the layout themselves:

- ``load_state_dict`` puts a loaded tensor on the host or on its parameter's device by its slot;
- the memory calculator (:mod:`slimtrain.memory`) counts bytes per :attr:`Slot.kind` from the slots of each
  parameter of an optimizer built on a meta-device model, without creating any state;
- a moment's 8-bit storage takes its map from the moment's declared sign (:class:`Moment`);
- ``tests/test_memory.py`` checks that the declaration is what a real step creates, key for key and
  byte for byte, for every method.

Host slots are the integer bookkeeping scalars (step counts, seeds, flags): read with ``int()`` or
``bool()`` at every step, they would synchronize a GPU if they lived on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


#: What a slot holds (:attr:`Slot.kind`): a running statistic of the gradient (``"moment"``: Adam's, fp32 values
#: or 8-bit codes), the per-block scales of an 8-bit moment (``"absmax"``), what defines a matrix's subspace
#: (``"projector"``: a basis, indices, SST's singular factors and sample) or a scalar (``"scalar"``: counters,
#: seeds, flags, Fira's limiter norm).
KINDS = ("moment", "absmax", "projector", "scalar")


@dataclass(frozen=True)
class Slot:
    """One tensor of a parameter's optimizer state, as its creator will make it."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    host: bool = False  # kept on the CPU whatever the parameter's device
    kind: str = "scalar"  # one of KINDS
    signed: bool = True  # a moment whose values can be negative (Adam's first); False: never (its second)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def counter(key: str, dtype: torch.dtype = torch.int64) -> Slot:
    """An integer (or flag) scalar kept on the host."""
    return Slot(key, (), dtype, host=True)


def projector_slot(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Slot:
    """A tensor that defines a matrix's subspace (a basis, indices, SST's factors), on the parameter's device."""
    return Slot(key, shape, dtype, kind="projector")


def counters(*keys: str) -> list[Slot]:
    return [counter(k) for k in keys]


ABSMAX_SUFFIX = "_absmax"


@dataclass(frozen=True)
class Moment:
    """A moment a rule keeps under ``key``, and whether its values can be negative: a signed one (Adam's first
    moment) is stored in 8 bits with bitsandbytes' signed map, an unsigned one (its second) with the unsigned
    map, which has twice the resolution."""

    key: str
    signed: bool


def adam_moments(suffix: str = "") -> tuple[Moment, Moment]:
    """Adam's first and second moments, ``exp_avg{suffix}`` and ``exp_avg_sq{suffix}``."""
    return Moment(f"exp_avg{suffix}", signed=True), Moment(f"exp_avg_sq{suffix}", signed=False)


#: The moments of a projected matrix's subspace step and of plain AdamW.
ADAM = adam_moments()


def moment_slots(group: dict, moments: Sequence[Moment], shape: Sequence[int]) -> list[Slot]:
    """``moments`` of ``shape``: uint8 codes plus one fp32 absmax per block when the group keeps 8-bit states and
    the moment has at least ``min_8bit_size`` elements, fp32 otherwise."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if group.get("state_bits", 32) == 8 and numel >= group["min_8bit_size"]:
        blocks = -(-numel // group["block_size"])
        out = []
        for m in moments:
            out += [Slot(m.key, shape, torch.uint8, kind="moment", signed=m.signed),
                    Slot(m.key + ABSMAX_SUFFIX, (blocks,), torch.float32, kind="absmax")]
        return out
    return [Slot(m.key, shape, torch.float32, kind="moment", signed=m.signed) for m in moments]


#: bf16 stochastic rounding's seed and counter (:class:`~slimtrain.optimizers.updates.RoundingStream`).
ROUNDING = (counter("sr_seed"), counter("sr_step"))


def rounding_slots(dtype: torch.dtype, group: dict) -> list[Slot]:
    """:data:`ROUNDING`, kept by every parameter whose updates are rounded stochastically."""
    return list(ROUNDING) if dtype == torch.bfloat16 and group.get("bf16_stochastic_round") else []


def host_keys(slots: Iterable[Slot]) -> set[str]:
    return {s.key for s in slots if s.host}


def nbytes(slots: Iterable[Slot]) -> int:
    return sum(s.nbytes for s in slots)


def describe(state: dict) -> list[Slot]:
    """The slots a real state dict holds (for comparing a declaration with what a step created)."""
    return [
        Slot(k, tuple(v.shape), v.dtype, host=v.device.type == "cpu")
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    ]
