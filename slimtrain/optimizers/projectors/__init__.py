"""Projectors: how a low-rank optimizer picks its subspace. One interface (:class:`Projector`), five
strategies, looked up by name so optimizer state and param groups hold strings, never objects."""

from __future__ import annotations

from .base import Projector, StoredBasisProjector
from .columns import ColumnsProjector
from .dct import DCTProjector
from .random import RandomProjector
from .randomized import RandomizedProjector
from .svd import SVDProjector

PROJECTORS: dict[str, type[Projector]] = {
    cls.name: cls
    for cls in (SVDProjector, RandomizedProjector, DCTProjector, RandomProjector, ColumnsProjector)
}


def make_projector(spec: str | Projector) -> Projector:
    """A projector from its name (default settings) or an instance (returned as is)."""
    if isinstance(spec, Projector):
        return spec
    if spec not in PROJECTORS:
        raise ValueError(f"Invalid projector: {spec!r} (expected one of {', '.join(map(repr, PROJECTORS))})")
    return PROJECTORS[spec]()


__all__ = [
    "PROJECTORS",
    "ColumnsProjector",
    "DCTProjector",
    "Projector",
    "RandomProjector",
    "RandomizedProjector",
    "SVDProjector",
    "StoredBasisProjector",
    "make_projector",
]
