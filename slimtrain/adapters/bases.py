"""Random bases drawn from seeds, shared by the tuners whose frozen factors are never saved (NOLA, RandLoRA).

Seeds are derived in :mod:`slimtrain._seeds` (``stable_seed``: hashlib, never Python's salted ``hash()``). Bases
come from counter-based Philox (:mod:`slimtrain.kernels.philox`), generated on the target device with the same
bits on CPU and GPU; the global RNG is never touched.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .._seeds import MAX_SEED, generator
from .._validation import check_int
from ..kernels.philox import philox_uniform

# How bases are drawn from a seed; configs record it (``generator_version``) so that a checkpoint always gets
# the bases it was trained with. Bump it whenever any basis changes, and keep the old path when cheap.
#   1: a CPU Mersenne Twister (``torch.Generator``) per seed, moved to the device.
#   2: Philox4x32-10 (:mod:`slimtrain.kernels.philox`), generated on the device (inside NOLA's kernels),
#      bit-identical on CPU and GPU.
GENERATOR_VERSION = 2


def check_seed(value: Any) -> int:
    """A config's ``seed``: hashed into 63-bit Philox keys but also used as is (S²FT's selection, RandLoRA's
    test-only init), so one range for all, [0, :data:`slimtrain._seeds.MAX_SEED`]."""
    return check_int("seed", value, 0, MAX_SEED)


def seeded_uniform(shape: Iterable[int], seed: int, low: float, high: float, *, generator_version: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 U(low, high) of ``shape`` on ``device``, a pure function of (seed, generator_version).

    Version 2 runs Philox on ``device`` itself (a GPU never waits for a CPU draw and a copy); version 1 is
    the CPU generator of adapters saved before it, for exact reloads.
    """
    if generator_version == 1:
        return uniform_on_cpu(shape, seed, low, high).to(device)
    return philox_uniform(seed, tuple(shape), low, high, device=device)


def uniform_on_cpu(shape: Iterable[int], seed: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """fp32 tensor of U(low, high) drawn on a CPU generator seeded with ``seed`` (same bits on any host; the
    bases of generator version 1)."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    return out.uniform_(low, high, generator=generator(seed))
