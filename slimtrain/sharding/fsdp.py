"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for slimtrain's optimizers: the placement that keeps every
projection on its rank's rows.

The optimizers take FSDP2's ``DTensor`` parameters themselves (:mod:`slimtrain.optimizers.dtensor`): build one on
the sharded model, as torch's AdamW. What this module adds is how to shard: ``docs/fsdp.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import Tensor

from ..optimizers._validation import PROJ_TYPES, check_choice
from ..optimizers.lowrank import projects_left


def low_rank_placement(proj_type: str = "std", *, mesh=None) -> Callable:
    """A ``shard_placement_fn`` for ``fully_shard`` under which every projection is row-local.

    A matrix whose projection compresses its rows (``proj_type``'s side rule: for ``"std"``, one wider than
    tall) is sharded along dimension 1, where its projection ``P^T G`` contracts nothing that is split;
    every other parameter along dimension 0, FSDP2's default. FSDP2 shards dimension 1 only when the mesh's
    size divides it; such a matrix stays on dimension 0 and its projection pays a reduce-scatter and an
    all-gather of the ``max(m, n) x r`` product each step (``docs/fsdp.md``).

    Args:
        proj_type: the optimizer's ``proj_type`` (default ``"std"``).
        mesh: the 1-D device mesh passed to ``fully_shard`` (default: every rank of the default group).

    Usage::

        place = low_rank_placement()
        for layer in model.model.layers:
            fully_shard(layer, shard_placement_fn=place)
        fully_shard(model, shard_placement_fn=place)
    """
    from torch.distributed.tensor import Shard

    check_choice("proj_type", proj_type, PROJ_TYPES)

    def place(param: Tensor):
        world = mesh.size() if mesh is not None else dist.get_world_size()
        if param.dim() == 2 and projects_left(param.shape, proj_type) and param.shape[1] % world == 0:
            return Shard(1)
        return Shard(0)

    return place
