"""Drop-in low-rank optimizers: swap ``torch.optim.AdamW`` for one of these in one line.

=================  ===========================================================================
``GaLoreAdamW``    Adam on the gradient projected to rank r (GaLore)
``FiraAdamW``      GaLore plus the rescaled out-of-subspace residual and norm-growth limiter (Fira)
``FrugalAdamW``    Adam on a state-full subspace or block set, signSGD on the rest (FRUGAL)
``DCTAdamW``       SVD-free: DCT basis columns picked by alignment with the gradient
``SSTAdamW``       Sparse Spectral Training in optimizer form (singular factors kept as state)
=================  ===========================================================================

All share :class:`~slimtrain.optimizers.base.LowRankAdamW`'s options and accept any projector from
:mod:`slimtrain.optimizers.projectors`. Build groups with :func:`low_rank_param_groups`.
"""

from .base import LowRankAdamW
from .dct import DCTAdamW
from .fira import FiraAdamW
from .frugal import FrugalAdamW
from .galore import GaLoreAdamW
from .groups import low_rank_param_groups
from .layerwise import LayerwiseStepper
from .projectors import PROJECTORS, make_projector
from .sst import SSTAdamW

OPTIMIZERS = {
    "galore": GaLoreAdamW,
    "fira": FiraAdamW,
    "frugal": FrugalAdamW,
    "dct": DCTAdamW,
    "sst": SSTAdamW,
}

__all__ = [
    "OPTIMIZERS",
    "PROJECTORS",
    "DCTAdamW",
    "FiraAdamW",
    "FrugalAdamW",
    "GaLoreAdamW",
    "LayerwiseStepper",
    "LowRankAdamW",
    "SSTAdamW",
    "low_rank_param_groups",
    "make_projector",
]
