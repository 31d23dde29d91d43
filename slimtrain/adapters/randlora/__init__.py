"""RandLoRA with seed-regenerated shared bases (nothing but lambda, gamma saved) and a dense fast path."""

from ..registry import register_method
from .config import RandLoraConfig, SlimRandLoraConfig
from .layer import GeneratedBasis, Linear, RandLoraLayer, generated_basis, make_bases, randlora_delta, scaled_bases
from .model import RandLoraModel

register_method("slimrandlora", RandLoraConfig, RandLoraModel, prefix="slimrandlora_")

__all__ = ["RandLoraConfig", "SlimRandLoraConfig", "RandLoraModel", "RandLoraLayer", "Linear", "GeneratedBasis",
           "generated_basis", "make_bases", "randlora_delta", "scaled_bases"]
