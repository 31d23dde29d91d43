"""NOLA: only the mixing coefficients of seeded random bases train (k + l per layer)."""

from ..registry import register_method
from .config import NolaConfig
from .layer import CombineBases, LegacyBases, Linear, NolaLayer, RandomBases, random_bases
from .model import NolaModel

register_method("nola", NolaConfig, NolaModel, prefix="nola_")

__all__ = ["NolaConfig", "NolaModel", "NolaLayer", "Linear", "CombineBases", "RandomBases", "LegacyBases",
           "random_bases"]
