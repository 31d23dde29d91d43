"""Sharded training for slimtrain's optimizers: PyTorch's FSDP2 and DeepSpeed ZeRO stages 1, 2 and 3.

**FSDP2**: shard the model with ``fully_shard`` (optionally with :func:`low_rank_placement`), then build the
optimizer on it, as with ``torch.optim.AdamW``; see ``docs/fsdp.md``::

    place = low_rank_placement()
    for layer in model.model.layers:
        fully_shard(layer, shard_placement_fn=place)
    fully_shard(model, shard_placement_fn=place)
    opt = GaLoreAdamW(low_rank_param_groups(model, ["self_attn", "mlp"], rank=128), lr=1e-2)

**DeepSpeed ZeRO**: keep your DeepSpeed JSON config; replace ``deepspeed.initialize`` by :func:`initialize`::

    from slimtrain.optimizers import GaLoreAdamW, low_rank_param_groups
    from slimtrain import sharding

    opt = GaLoreAdamW(low_rank_param_groups(model, ["self_attn", "mlp"], rank=128), lr=1e-2)
    engine, opt, _, _ = sharding.initialize(model=model, optimizer=opt, config="ds_config.json")

See :mod:`slimtrain.sharding.zero` for how the low-rank step is split across ranks under ZeRO, and
:mod:`slimtrain.optimizers.shards` for the sharded-matrix maths.
"""

from .api import initialize
from .fsdp import low_rank_placement
from .process_group import leave_process_group
from .traffic import CollectiveCounter
from .zero import ZeroLowRankOptimizer

__all__ = ["CollectiveCounter", "ZeroLowRankOptimizer", "initialize", "leave_process_group", "low_rank_placement"]
