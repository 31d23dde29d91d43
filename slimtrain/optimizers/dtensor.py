"""FSDP2's ``DTensor`` parameters (``torch.distributed.fsdp.fully_shard``): what such a parameter is, as a
:class:`~slimtrain.optimizers.shards.MatrixShard`, its step on this rank's piece, and its state as ``DTensor`` s.

FSDP2 parameters are ``DTensor`` s on a 1-D device mesh, each rank holding one ``torch.chunk`` piece along
dimension 0, or along the dimension a ``shard_placement_fn`` names (FSDP2 shards a dimension other than 0
only evenly; :func:`slimtrain.sharding.low_rank_placement` is one). The optimizer steps each piece through its
own step rule, with the sharded-matrix maths of :mod:`.shards` (which does not know FSDP2) as the rule's layout;
this module reads the ``DTensor`` and keeps the state as the ``DTensor`` s that ``torch.distributed.checkpoint``
saves and reshards. See ``docs/fsdp.md``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ._validation import is_dtensor, refuse_swapped_param
from .functional import descent
from .layout import WholeMatrix
from .rule import matrix_shape
from .shard_layout import ShardedMatrix
from .shards import MatrixShard, balanced_owners
from .updates import apply_


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


def check_group(group: dict, optimizer: str) -> None:
    """Refuse, when the optimizer is built, a param group whose ``DTensor`` parameters or options the sharded step
    cannot take (``RuntimeError`` naming the parameter or option and what to do instead)."""
    for p in group["params"]:
        if not is_dtensor(p):
            continue
        check_dtensor(p)
        if group["bf16_stochastic_round"] and p.dtype == torch.bfloat16:
            raise RuntimeError(
                f"Unsupported bf16_stochastic_round=True for a bf16 DTensor parameter of shape {tuple(p.shape)} in "
                f"{optimizer}: each rank would draw the rounding noise of its own piece, not one process's. Keep fp32 "
                "sharded weights (fully_shard(..., mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16)) "
                "computes in bf16) and set bf16_stochastic_round=False"
            )


class ShardedSteps:
    """The FSDP2 side of one slimtrain optimizer: where each ``DTensor`` parameter's piece lies (its
    :class:`~slimtrain.optimizers.shard_layout.ShardedMatrix`, with the rank that refreshes its subspace), its step
    on this rank's pieces through the optimizer's own rule, and its state kept as ``DTensor`` s (split moments) and
    plain tensors (what every rank keeps whole), which ``torch.distributed.checkpoint`` saves and reshards.

    Every rank must step every parameter, in the same order (``optimizer.step()`` does; so do FSDP2's gradient
    hooks in layer-wise training): the step's collectives are matched across ranks by that order.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self._owners: dict[int, int] = {}

    def _owner(self, p: Tensor) -> int:
        """The rank that refreshes ``p``'s subspace from its whole gradient: the refreshes of each process group's
        matrices balanced by their cost (``m n min(m, n)``, an SVD's), the same on every rank."""
        if id(p) not in self._owners:
            opt = self.optimizer
            by_group: dict = {}
            for group in opt.param_groups:
                for q in group["params"]:
                    if is_dtensor(q) and opt._projected(q, group) and matrix_shard(q) is not None:
                        by_group.setdefault(matrix_shard(q).group, []).append(q)
            for pg, params in by_group.items():
                costs = [math.prod(matrix_shape(q)) * min(matrix_shape(q)) for q in params]
                for q, owner in zip(params, balanced_owners(costs, matrix_shard(params[0]).world)):
                    self._owners[id(q)] = owner
        return self._owners.get(id(p), 0)

    def layout(self, p: Tensor):
        """Where ``p``'s piece lies: a :class:`~slimtrain.optimizers.shard_layout.ShardedMatrix`, or the whole
        parameter where every rank holds all of it (``Replicate``)."""
        shard = matrix_shard(p)
        if shard is None:
            return WholeMatrix(p.shape)
        return ShardedMatrix(p.shape, shard, self._owner(p), p.to_local().shape)

    def step(self, p: Tensor, group: dict) -> None:
        """One step of the ``DTensor`` parameter ``p`` on this rank's piece of it."""
        opt = self.optimizer
        state = opt.state[p]
        layout = self.layout(p)
        view = {k: v.to_local() if is_dtensor(v) else v for k, v in state.items()}
        before = dict(view)
        weight = p.to_local()
        grad = descent(p.grad.to_local(), group["maximize"])
        if not opt._projected(p, group):
            direction, size = opt._dense_update(grad.float(), group, view, layout.dense_moments())
            apply_(weight, group, direction, size, None)
        else:
            matrix = grad.reshape(grad.shape[0], math.prod(grad.shape[1:]))  # the piece's rows, or its columns
            update = opt.rule.update(p, matrix, group, view, opt._context(p, group, layout))
            update.apply_(weight, group, None)
        self._keep(p, state, view, before, getattr(layout, "created", {}))

    @staticmethod
    def _keep(p: Tensor, state: dict, view: dict, before: dict, created: dict) -> None:
        """Store the step's state: pieces the step created as ``DTensor`` s of the whole shapes ``created`` records,
        pieces of existing ``DTensor`` s in place (or re-wrapped where the step replaced them), the rest as is."""
        from torch.distributed.tensor import DTensor

        for key in set(state) - set(view):
            del state[key]
        for key, value in view.items():
            old = state.get(key)
            if key in created:
                shape, dim = created[key]
                state[key] = as_sharded(value, p, shape, dim)
            elif value is before.get(key):
                continue
            elif old is not None and is_dtensor(old):
                state[key] = DTensor.from_local(value, old.device_mesh, old.placements, run_check=False,
                                                shape=old.shape, stride=old.stride())
            else:
                state[key] = value

    @staticmethod
    def all_ranks(flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank (one all-reduce, of a tensor on ``device``: NCCL's are on the GPU)."""
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        if dist.get_world_size() > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() == 1.0)


class DTensorParams:
    """Mixin of :class:`~slimtrain.optimizers.base.LowRankAdamW`: its ``DTensor`` parameters, stepped through
    :class:`ShardedSteps`, and those swapped in after it was built."""

    def _adopt_swapped(self) -> None:
        """Take the ``DTensor`` parameters that replaced the ones this optimizer was built with, where nothing can be
        lost: Accelerate's FSDP2 preparation shards the model after the optimizer was built and swaps each entry
        of its param groups for the sharded parameter of the same name. Each replacement must be a ``DTensor`` of
        the global shape of the parameter it replaces, and the optimizer must not have stepped yet (its state
        belongs to the tensors it was built with). Anything else is refused, naming what to do instead."""
        params = [q for g in self.param_groups for q in g["params"]]
        swapped = [(i, q) for i, q in enumerate(params) if id(q) not in self._param_indices]
        if not swapped:
            return
        for i, q in swapped:
            if not is_dtensor(q):
                refuse_swapped_param(q)
            if any(self.state.values()):
                refuse_swapped_param(q, "it has stepped already, and its state belongs to the parameters it was built "
                                        "with")
            if i >= len(self._param_shapes) or self._param_shapes[i] != tuple(q.shape):
                was = f"of shape {self._param_shapes[i]}" if i < len(self._param_shapes) else "none"
                refuse_swapped_param(q, f"it is parameter {i}, which was {was} when the optimizer was built")
        for group in self.param_groups:
            self._validate_group(group)
        self._index_params()
        self._sharded_steps = None

    def _fsdp(self):
        """The FSDP2 side of this optimizer (:class:`~slimtrain.optimizers.dtensor.ShardedSteps`), made on first use."""
        if getattr(self, "_sharded_steps", None) is None:
            self._sharded_steps = ShardedSteps(self)
        return self._sharded_steps
