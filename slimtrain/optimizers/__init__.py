"""Drop-in low-rank optimizers: swap ``torch.optim.AdamW`` for one of these in one line.

=================  ===========================================================================
``GaLoreAdamW``    Adam on the gradient projected to rank r (GaLore)
``FiraAdamW``      GaLore plus the rescaled out-of-subspace residual and norm-growth limiter (Fira)
``FrugalAdamW``    Adam on a state-full subspace or block set, signSGD on the rest (FRUGAL)
``DCTAdamW``       SVD-free: DCT basis columns picked by alignment with the gradient
``SSTAdamW``       Sparse Spectral Training in optimizer form (singular factors kept as state)
=================  ===========================================================================

All share :class:`~slimtrain.optimizers.base.LowRankAdamW`'s options and accept any projector from
:mod:`slimtrain.optimizers.projectors`, whose classes are exported here too (``SVDProjector(basis_dtype="bf16")``).
Build groups with :func:`low_rank_param_groups`. Each has an ``...8bit`` twin (``GaLoreAdamW8bit``, ...) keeping
its moments in 8 bits (``state_bits=8``; see :mod:`slimtrain.optimizers.moments`). :data:`OPTIMIZERS` maps each
method's name to its class; a method is named once, in :mod:`slimtrain.optimizers.registry`.
"""

# The methods register themselves on import, in this order (the order of OPTIMIZERS and of every list of them).
from .base import LowRankAdamW
from .galore import GaLoreAdamW, GaLoreAdamW8bit
from .fira import FiraAdamW, FiraAdamW8bit
from .frugal import FrugalAdamW, FrugalAdamW8bit
from .dct import DCTAdamW, DCTAdamW8bit
from .sst import SSTAdamW, SSTAdamW8bit
from .groups import low_rank_param_groups
from .layerwise import LayerwiseStepper
from .projectors import (
    PROJECTORS,
    ColumnsProjector,
    DCTProjector,
    Projector,
    RandomizedProjector,
    RandomProjector,
    SVDProjector,
    make_projector,
)
from .registry import OPTIMIZERS, register_method
from .spectral import SpectralLinear, SpectralSSTAdamW, merge_spectral, to_spectral

__all__ = [
    "OPTIMIZERS",
    "PROJECTORS",
    "ColumnsProjector",
    "DCTAdamW",
    "DCTAdamW8bit",
    "DCTProjector",
    "FiraAdamW",
    "FiraAdamW8bit",
    "FrugalAdamW",
    "FrugalAdamW8bit",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseStepper",
    "LowRankAdamW",
    "Projector",
    "RandomProjector",
    "RandomizedProjector",
    "SSTAdamW",
    "SSTAdamW8bit",
    "SpectralLinear",
    "SVDProjector",
    "SpectralSSTAdamW",
    "merge_spectral",
    "register_method",
    "to_spectral",
    "low_rank_param_groups",
    "make_projector",
]
