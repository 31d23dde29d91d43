"""DeepSpeed ZeRO stages 1, 2 and 3 for slimtrain's optimizers.

Keep your DeepSpeed JSON config; replace ``deepspeed.initialize`` by :func:`initialize`::

    from slimtrain.optimizers import GaLoreAdamW, low_rank_param_groups
    from slimtrain import sharding

    opt = GaLoreAdamW(low_rank_param_groups(model, ["self_attn", "mlp"], rank=128), lr=1e-2)
    engine, opt, _, _ = sharding.initialize(model=model, optimizer=opt, config="ds_config.json")

See :mod:`slimtrain.sharding.zero` for how the low-rank step is split across ranks.
"""

from .api import initialize
from .zero import ZeroLowRankOptimizer

__all__ = ["ZeroLowRankOptimizer", "initialize"]
