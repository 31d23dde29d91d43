"""The declared layout of optimizer state: which keys a parameter's state holds, their shapes, dtypes,
and whether they live on the host.

Every piece of the optimizer family that keeps per-parameter state declares it here, as a list of
:class:`Slot`: a step rule (:meth:`StepRule.state_spec <slimtrain.optimizers.rule.StepRule.state_spec>`),
a projector (:meth:`Projector.state_spec <slimtrain.optimizers.projectors.Projector.state_spec>`), Adam's
moments (:func:`moment_slots`, which :func:`~slimtrain.optimizers.quantized.init_moments` also creates
its tensors from) and bf16 stochastic rounding (:func:`rounding_slots`). Three readers use the
declaration instead of knowing the layout themselves:

- ``load_state_dict`` puts a loaded tensor on the host or on its parameter's device by its slot;
- the memory calculator (:mod:`slimtrain.memory`) counts bytes from the slots of each parameter of an
  optimizer built on a meta-device model, without creating any state;
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


@dataclass(frozen=True)
class Slot:
    """One tensor of a parameter's optimizer state, as its creator will make it."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    host: bool = False  # kept on the CPU whatever the parameter's device

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def counter(key: str, dtype: torch.dtype = torch.int64) -> Slot:
    """An integer (or flag) scalar kept on the host."""
    return Slot(key, (), dtype, host=True)


def counters(*keys: str) -> list[Slot]:
    return [counter(k) for k in keys]


ABSMAX_SUFFIX = "_absmax"


def moment_slots(group: dict, keys: Sequence[str], shape: Sequence[int]) -> list[Slot]:
    """Adam moments of ``shape`` under ``keys``: uint8 codes plus one fp32 absmax per block when the group keeps
    8-bit states and the moment has at least ``min_8bit_size`` elements, fp32 otherwise."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if group.get("state_bits", 32) == 8 and numel >= group["min_8bit_size"]:
        blocks = -(-numel // group["block_size"])
        out = []
        for key in keys:
            out += [Slot(key, shape, torch.uint8), Slot(key + ABSMAX_SUFFIX, (blocks,), torch.float32)]
        return out
    return [Slot(key, shape, torch.float32) for key in keys]


#: bf16 stochastic rounding's seed and counter (:func:`~slimtrain.optimizers.quantized.rounding_generator`).
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
