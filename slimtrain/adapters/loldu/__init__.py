"""LoLDU (Shi et al., 2024): train only the diagonal of a frozen pivoted LDU of each weight.

Importing this package registers the method with PEFT (``peft_type`` ``"LOLDU"``), so ``get_peft_model``
and ``PeftModel.from_pretrained`` accept `LoLDUConfig` and LoLDU checkpoints.
"""

from ..registry import register_method
from .config import LoLDUConfig
from .layer import LoLDULayer, Linear, ldu_factors, loldu_coefficients, loldu_delta_output, loldu_delta_weight
from .model import LoLDUModel

register_method("loldu", LoLDUConfig, LoLDUModel, prefix="loldu_")

__all__ = [
    "LoLDUConfig",
    "LoLDUModel",
    "LoLDULayer",
    "Linear",
    "ldu_factors",
    "loldu_coefficients",
    "loldu_delta_output",
    "loldu_delta_weight",
]
