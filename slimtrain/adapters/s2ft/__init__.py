"""S²FT, structured sparse fine-tuning (Yang et al., NeurIPS 2024): dense blocks over selected heads/channels.

Importing this package registers the method with PEFT (``peft_type`` ``"S2FT"``).
"""

from ..registry import register_method
from .config import DEFAULT_ROLES, ROLES, SELECTIONS, S2FTConfig
from .layer import Linear, S2FTLayer, s2ft_delta_output, s2ft_delta_weight
from .model import S2FTModel, block_of, head_group_cols, head_rows, role_of, select_units

register_method("s2ft", S2FTConfig, S2FTModel, prefix="s2ft_")

__all__ = [
    "DEFAULT_ROLES",
    "ROLES",
    "SELECTIONS",
    "S2FTConfig",
    "S2FTModel",
    "S2FTLayer",
    "Linear",
    "block_of",
    "head_group_cols",
    "head_rows",
    "role_of",
    "s2ft_delta_output",
    "s2ft_delta_weight",
    "select_units",
]
