"""Every seed slimtrain derives, for optimizers and adapters alike, each by one documented function.

A derived seed names a random stream that must come back exactly: after a checkpoint reload, on another
rank, in another process. The global RNG is never used for one, and Python's ``hash()`` (salted per
process) never names one. Seeds saved in checkpoints (``proj_seed``, ``sst_seed``, ``sr_seed``) and in
adapter configs (``seed``) are the inputs here, so each function below computes exactly what the code that
wrote them computed: a formula is never changed, only added (a new stream family gets a new function).

**Optimizer streams** are counters under a parent seed, one multiplier per family:

.. math:: \\mathrm{child}(s, k) = (s \\cdot M + k) \\bmod (2^{63} - 1)

(:func:`child_seed`), a different multiplier per family so that one parameter's streams of different
families do not line up:

=====================  ==========================  ===============================================
``M``                  parent, counter             function
=====================  ==========================  ===============================================
:data:`PARAMETER`      optimizer ``seed``, the     :func:`parameter_seed` (not reduced mod
(1_000_003)            parameter's position        2**63 - 1: the value saved as ``proj_seed`` /
                                                   ``sst_seed`` / ``sr_seed``)
:data:`PARAMETER`      ``proj_seed``, refresh k    :func:`projector_stream_seed`
:data:`PARAMETER`      optimizer ``seed``,         :func:`block_order_seed` (not reduced; the
                       refresh k                   parameter seed's formula, as FRUGAL has used it)
:data:`PARAMETER`      a recipe's ``--seed``,      :func:`data_order_seed` (not reduced; the recipes'
                       epoch                       batch order)
:data:`ROUNDING`       ``sr_seed``, rounding t     :func:`rounding_stream_seed`
(2_000_029)
:data:`SST_DRAW`       ``sst_seed``, draw k        :func:`sst_draw_seed`
(7_919)
=====================  ==========================  ===============================================

**Adapter streams** are named by strings (module names, parts), so they hash:
:func:`stable_seed` (SHA-256 of the parts' ``repr``, 63 bits) for bases and inits, fed to Philox
(:mod:`slimtrain.kernels.philox`) or a CPU Mersenne Twister (:func:`generator`); S²FT's selection
(:func:`s2ft_selection_seed`, CRC32 of the block's name) and RandLoRA's test-only init
(:func:`randlora_init_seed`) predate it and keep their own formulas.

Every seed goes into a generator through :func:`generator`. ``tests/optimizers/test_seeds.py`` and
``tests/adapters/test_seeds.py`` pin each function's values and checkpoints and adapters written by the
code before this module.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import torch

#: The largest seed an adapter config accepts: Philox keys and ``torch.Generator.manual_seed``'s signed
#: range are [0, 2**63 - 1], and S²FT's selection reduces mod 2**63, so a larger seed would alias a smaller one.
MAX_SEED = 2**63 - 1
_MODULUS = 2**63 - 1

PARAMETER = 1_000_003
ROUNDING = 2_000_029
SST_DRAW = 7_919

#: The largest optimizer ``seed``: a parameter's seed ``seed * 1_000_003 + index`` is kept as an int64 tensor
#: (``proj_seed``, ``sst_seed``, ``sr_seed``), and must fit for every index below 2**31.
MAX_OPTIMIZER_SEED = (MAX_SEED - 2**31) // PARAMETER


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``; independent of ``torch.manual_seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))


# ------------------------------------------------------------------------------------------- optimizers
def child_seed(parent: int, counter: int, multiplier: int) -> int:
    """``(parent * multiplier + counter) mod (2**63 - 1)``: the ``counter``-th stream under ``parent``."""
    return (int(parent) * multiplier + int(counter)) % _MODULUS


def parameter_seed(seed: int, index: int) -> int:
    """A parameter's seed from the optimizer's ``seed`` and the parameter's position among all its
    parameters: ``seed * 1_000_003 + index``, not reduced (the value checkpoints hold as ``proj_seed``,
    ``sst_seed`` and ``sr_seed``)."""
    return int(seed) * PARAMETER + int(index)


def projector_stream_seed(proj_seed: int, refresh: int) -> int:
    """The projector's draw at refresh ``refresh`` (0 for the first) of the parameter seeded ``proj_seed``."""
    return child_seed(proj_seed, refresh, PARAMETER)


def block_order_seed(seed: int, refresh: int) -> int:
    """FRUGAL's random choice of active blocks at refresh ``refresh``: ``seed * 1_000_003 + refresh``, not
    reduced (the formula of :func:`parameter_seed`, as FRUGAL has always drawn it)."""
    return parameter_seed(seed, refresh)


def data_order_seed(seed: int, epoch: int) -> int:
    """The recipes' batch order for ``epoch`` (:class:`slimtrain.recipes.data.TokenBlocks`): ``seed * 1_000_003 +
    epoch``, not reduced (the parameter seed's formula, as the recipes have used it)."""
    return int(seed) * PARAMETER + int(epoch)


def rounding_stream_seed(sr_seed: int, step: int) -> int:
    """Stochastic rounding's ``step``-th draw (1 for the first) for the parameter seeded ``sr_seed``."""
    return child_seed(sr_seed, step, ROUNDING)


def sst_draw_seed(sst_seed: int, draw: int) -> int:
    """SST's ``draw``-th sampling of singular vectors (0 for the first) for the parameter seeded ``sst_seed``."""
    return child_seed(sst_seed, draw, SST_DRAW)


# ------------------------------------------------------------------------------------------- adapters
def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (ints, strs, shapes) that is identical across processes and machines:
    the first 8 bytes (little-endian) of SHA-256 of the parts' ``repr`` joined by ``\\x1f``, top bit cleared."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def s2ft_selection_seed(seed: int, tag: str) -> int:
    """S²FT's random selection in the block named ``tag``: ``(seed * 2654435761 + crc32(tag)) mod 2**63``
    (CRC32, not ``hash()``: the selection must repeat across processes)."""
    return (int(seed) * 2654435761 + zlib.crc32(tag.encode())) % (2**63)


def randlora_init_seed(seed: int) -> int:
    """RandLoRA's non-zero lambda at init (``init_weights=False``, tests only): ``seed + 1``."""
    return int(seed) + 1
