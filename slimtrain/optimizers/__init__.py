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
its moments in 8 bits (``state_bits=8``; see :mod:`slimtrain.optimizers.quantized`).
"""

from .base import LowRankAdamW
from .dct import DCTAdamW, DCTAdamW8bit
from .fira import FiraAdamW, FiraAdamW8bit
from .frugal import FrugalAdamW, FrugalAdamW8bit
from .galore import GaLoreAdamW, GaLoreAdamW8bit
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
from .sst import SSTAdamW, SSTAdamW8bit
from .spectral import SpectralLinear, SpectralSSTAdamW, merge_spectral, to_spectral

OPTIMIZERS = {
    "galore": GaLoreAdamW,
    "fira": FiraAdamW,
    "frugal": FrugalAdamW,
    "dct": DCTAdamW,
    "sst": SSTAdamW,
    "galore8bit": GaLoreAdamW8bit,
    "fira8bit": FiraAdamW8bit,
    "frugal8bit": FrugalAdamW8bit,
    "dct8bit": DCTAdamW8bit,
    "sst8bit": SSTAdamW8bit,
}

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
    "to_spectral",
    "low_rank_param_groups",
    "make_projector",
]
