"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for slimtrain's optimizers: what a ``DTensor`` parameter is,
as a :class:`~slimtrain.sharding.matrix_shards.MatrixShard`, and the placement that keeps projections local.

FSDP2 parameters are ``DTensor`` s on a 1-D device mesh, each rank holding one ``torch.chunk`` piece along
dimension 0, or along the dimension a ``shard_placement_fn`` names (FSDP2 shards a dimension other than 0
only evenly). The optimizer steps each piece with the sharded-matrix maths of :mod:`.matrix_shards`, which
does not know FSDP2; this module reads the ``DTensor`` and builds the ``DTensor`` state that
``torch.distributed.checkpoint`` saves and reshards. See ``docs/fsdp.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..optimizers.lowrank import projects_left
from .matrix_shards import MatrixShard


def is_dtensor(t: Tensor) -> bool:
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter or not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


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

    from ..optimizers._validation import PROJ_TYPES, check_choice

    check_choice("proj_type", proj_type, PROJ_TYPES)

    def place(param: Tensor):
        world = mesh.size() if mesh is not None else dist.get_world_size()
        if param.dim() == 2 and projects_left(param.shape, proj_type) and param.shape[1] % world == 0:
            return Shard(1)
        return Shard(0)

    return place


def check_dtensor(p: Tensor) -> None:
    """Refuse a ``DTensor`` parameter the sharded step cannot take (``RuntimeError`` naming its layout)."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    what = f"a DTensor parameter of shape {tuple(p.shape)} placed {placements} on a {mesh.ndim}-D mesh"
    if mesh.ndim != 1:
        raise RuntimeError(
            f"Unsupported parameter: {what}. slimtrain optimizers step FSDP2's fully_shard parameters on a 1-D "
            "mesh; HSDP and tensor parallelism (2-D meshes) are not supported: shard over one mesh dimension"
        )
    placement = placements[0]
    if isinstance(placement, Replicate):
        return
    if not isinstance(placement, Shard) or placement.dim not in (0, 1) or (placement.dim == 1 and p.dim() != 2):
        raise RuntimeError(
            f"Unsupported parameter: {what}. slimtrain optimizers step parameters sharded along dimension 0 "
            "(fully_shard's default), matrices also along dimension 1 (slimtrain.sharding.low_rank_placement), "
            "or replicated"
        )


def matrix_shard(p: Tensor) -> MatrixShard | None:
    """The :class:`MatrixShard` of a ``DTensor`` parameter seen as its ``m x n`` matrix (convolutions as
    ``shape[0] x rest``; vectors as ``n x 1``), or ``None`` when every rank holds all of it (``Replicate``)."""
    from torch.distributed.tensor import Shard

    check_dtensor(p)
    placement = p.placements[0]
    if not isinstance(placement, Shard):
        return None
    mesh = p.device_mesh
    shape = (p.shape[0], math.prod(p.shape[1:]))
    return MatrixShard(shape, placement.dim, mesh.get_local_rank(0), mesh.size(0), mesh.get_group(0))


def contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(tuple(shape)):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def as_sharded(local: Tensor, like: Tensor, shape, dim: int) -> Tensor:
    """A ``DTensor`` of global ``shape`` on ``like``'s mesh whose piece on this rank is ``local`` (no copy),
    split along ``dim`` by ``torch.chunk`` (uneven pieces allowed)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = tuple(shape)
    return DTensor.from_local(local, like.device_mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                              stride=contiguous_stride(shape))


def local(t: Tensor) -> Tensor:
    """A ``DTensor``'s piece on this rank (the same storage); any other tensor as it is."""
    return t.to_local() if is_dtensor(t) else t
