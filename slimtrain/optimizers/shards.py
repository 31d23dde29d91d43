"""Sharded-matrix maths that every sharding engine shares: a matrix cut into one ``torch.chunk`` piece per
rank along one dimension, and the collectives a low-rank step needs on it.

Nothing here knows which engine made the pieces: :mod:`slimtrain.optimizers.dtensor` describes an FSDP2
``DTensor`` parameter as a :class:`MatrixShard`, and another engine whose pieces are whole rows or columns can do
the same. :mod:`slimtrain.optimizers.shard_layout` builds a step rule's layout on such a piece from them, the
counterpart of :class:`~slimtrain.optimizers.layout.WholeMatrix`. ``docs/fsdp.md`` explains the design; in
short, in the oriented frame of ``optimizers/projectors/base.py`` (``G'`` is ``m' x n'``, the projection
contracts ``n'``):

- a **row-local** shard holds whole rows of ``G'``: projecting, Adam, per-row rules and the back projection
  run on its rows with the replicated basis, with no communication;
- a **contracted** shard holds whole columns of ``G'``: its partial products ``G'_k B_k^T`` are
  reduce-scattered into the rows of ``R`` whose moments the rank holds, and the direction is all-gathered
  back (:meth:`OrientedShard.project`, :meth:`OrientedShard.rows_for_back_projection`).

Either way the rank holds the rows ``chunk(m')[rank]`` of every ``m' x r`` moment. Refreshes that need the
whole gradient gather it to one owner rank (:meth:`OrientedShard.gather_to`, :func:`balanced_owners`) and
broadcast what it computed (:func:`broadcast_tensors`). :class:`BlockPiece` quantizes a rank's piece of a
tensor in the blocks of the whole tensor, so 8-bit state does not depend on the partition.

Every function that communicates must be called by every rank of the group, in the same order, including
ranks whose piece is empty. Collectives are looked up on ``torch.distributed`` at call time (so a counter
wrapping them, :mod:`slimtrain.sharding.traffic`, sees them) and addressed by group rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def chunk_bounds(size: int, world: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of each rank's piece when ``size`` elements are split as ``torch.chunk`` splits them
    (pieces of ``ceil(size / world)``, the last ones shorter or empty): FSDP2's and DTensor's ``Shard`` rule."""
    step = -(-size // world) if size else 0
    return tuple((min(k * step, size), min((k + 1) * step, size)) for k in range(world))


def balanced_owners(costs: Sequence[float], world: int) -> list[int]:
    """An owner rank for each item, greedily balancing the summed ``costs`` (largest first, ties to the lower
    index and rank): the same answer on every rank for the same costs."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += costs[i]
    return owners


@dataclass(frozen=True)
class MatrixShard:
    """One rank's piece of an ``m x n`` matrix split along ``dim`` into ``torch.chunk`` pieces, one per rank of
    ``group`` (``None``: the default group). A piece may be empty."""

    shape: tuple[int, int]
    dim: int
    rank: int
    world: int
    group: Any = None

    def __post_init__(self):
        if self.dim not in (0, 1):
            raise ValueError(f"Invalid dim: {self.dim} (expected 0 or 1)")
        if not 0 <= self.rank < self.world:
            raise ValueError(f"Invalid rank: {self.rank} (expected 0 <= rank < world = {self.world})")

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        return chunk_bounds(self.shape[self.dim], self.world)

    @property
    def local_shape(self) -> tuple[int, int]:
        start, stop = self.bounds[self.rank]
        return (stop - start, self.shape[1]) if self.dim == 0 else (self.shape[0], stop - start)

    def piece(self, full: Tensor, rank: int | None = None) -> Tensor:
        """``rank``'s piece (default: this rank's) of the whole matrix ``full``, a view."""
        start, stop = self.bounds[self.rank if rank is None else rank]
        return full.narrow(self.dim, start, stop - start)

    def oriented(self, transposed: bool) -> OrientedShard:
        """This shard in the oriented frame of a projection, transposed for a left one."""
        return OrientedShard(self, transposed)


@dataclass(frozen=True)
class OrientedShard:
    """A :class:`MatrixShard` in the oriented frame ``G'`` (``m' x n'``) of a projection that contracts ``n'``."""

    shard: MatrixShard
    transposed: bool

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self.shard.shape
        return (n, m) if self.transposed else (m, n)

    @property
    def row_local(self) -> bool:
        """Whether the piece holds whole rows of ``G'`` (projection and back projection need no message)."""
        return (self.shard.dim == 0) != self.transposed

    @property
    def world(self) -> int:
        return self.shard.world

    @property
    def rows(self) -> tuple[int, int]:
        """The rows of ``G'`` whose moments this rank holds: ``chunk(m')[rank]``, the piece's own rows when
        row-local."""
        return chunk_bounds(self.shape[0], self.world)[self.shard.rank]

    @property
    def cols(self) -> tuple[int, int]:
        """The columns of ``G'`` this rank holds: all of them when row-local."""
        return (0, self.shape[1]) if self.row_local else self.shard.bounds[self.shard.rank]

    def orient(self, piece: Tensor) -> Tensor:
        """The rank's piece of the user's matrix as its piece of ``G'`` (a view)."""
        return piece.T if self.transposed else piece

    # ------------------------------------------------------------------------------------------
    # Projection
    def project(self, grad_t: Tensor, basis: Tensor) -> Tensor:
        """This rank's rows of ``R = G' B^T`` from its piece ``grad_t`` of ``G'`` (fp32) and the whole ``r x n'``
        basis: a local matmul when row-local, else a reduce-scatter of the partial products."""
        if self.row_local:
            return grad_t @ basis.T
        start, stop = self.cols
        return self.reduce_scatter_rows(grad_t @ basis[:, start:stop].T)

    def rows_for_back_projection(self, *rows: Tensor) -> list[Tensor]:
        """The rows of ``m' x k`` tensors (direction, ``R``, per-row factors as columns) that this rank's piece
        of ``G'`` needs to project back: its own rows when row-local, else all of them, gathered in one
        all-gather of the tensors side by side."""
        if self.row_local:
            return list(rows)
        widths = [1 if t.dim() == 1 else t.shape[1] for t in rows]
        side = torch.cat([t.reshape(t.shape[0], w).float() for t, w in zip(rows, widths)], dim=1)
        whole = self.gather_rows(side)
        out, at = [], 0
        for t, w in zip(rows, widths):
            piece = whole[:, at : at + w]
            out.append(piece.reshape(-1) if t.dim() == 1 else piece)
            at += w
        return out

    def local_basis(self, basis: Tensor) -> Tensor:
        """The columns of the ``r x n'`` basis that this rank's piece of ``G'`` is projected back with."""
        start, stop = self.cols
        return basis if self.row_local else basis[:, start:stop]

    # ------------------------------------------------------------------------------------------
    # Collectives over rows
    def reduce_scatter_rows(self, full: Tensor) -> Tensor:
        """Sum ``m' x k`` partial tensors over the ranks, keeping this rank's rows of the sum."""
        if self.world == 1:
            return full
        m, k = full.shape
        step = -(-m // self.world)
        padded = full.new_zeros(step * self.world, k)
        padded[:m] = full
        out = full.new_empty(step, k)
        dist.reduce_scatter_single(out, padded, group=self.shard.group)
        start, stop = self.rows
        return out[: stop - start]

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's rows of an ``m' x k`` tensor, put together on every rank."""
        if self.world == 1:
            return rows
        m = self.shape[0]
        step = -(-m // self.world)
        padded = rows.new_zeros(step, rows.shape[1])
        padded[: rows.shape[0]] = rows
        out = rows.new_empty(step * self.world, rows.shape[1])
        dist.all_gather_single(out, padded, group=self.shard.group)
        return out[:m]

    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce ``t`` in place with ``SUM`` (sums over rows of a row-local shard, over columns of a
        contracted one)."""
        if self.world > 1:
            dist.all_reduce(t, group=self.shard.group)
        return t

    # ------------------------------------------------------------------------------------------
    # Whole matrices at one owner
    def gather_to(self, owner: int, piece: Tensor) -> Tensor | None:
        """The whole ``G'`` on rank ``owner`` (``None`` elsewhere) from each rank's piece of the user's matrix
        (in the user's orientation; sent in its own dtype)."""
        shard = self.shard
        if self.world == 1:
            return self.orient(piece)
        step = -(-shard.shape[shard.dim] // self.world)
        padded_shape = list(shard.shape)
        padded_shape[shard.dim] = step
        send = piece.new_zeros(padded_shape)
        send.narrow(shard.dim, 0, piece.shape[shard.dim]).copy_(piece)
        inbox = [torch.empty_like(send) for _ in range(self.world)] if shard.rank == owner else None
        dist.gather(send, inbox, group=shard.group, group_dst=owner)
        if inbox is None:
            return None
        parts = [box.narrow(shard.dim, 0, stop - start) for box, (start, stop) in zip(inbox, shard.bounds)]
        return self.orient(torch.cat(parts, dim=shard.dim))


def broadcast_tensors(tensors: Sequence[Tensor], owner: int, group: Any = None,
                      device: torch.device | None = None) -> None:
    """Overwrite ``tensors`` on every rank with rank ``owner``'s, in place: one broadcast per dtype, of the
    tensors packed flat on ``device`` (default: the first tensor's; NCCL needs the accelerator's, where the
    host counters are copied to and back)."""
    if not tensors or dist.get_world_size(group) == 1:
        return
    device = tensors[0].device if device is None else device
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, same in by_dtype.items():
        flat = torch.cat([t.reshape(-1).to(device) for t in same])
        dist.broadcast(flat, group=group, group_src=owner)
        at = 0
        for t in same:
            t.copy_(flat[at : at + t.numel()].view(t.shape))
            at += t.numel()


def all_reduce_max_(t: Tensor, group: Any = None) -> Tensor:
    """All-reduce ``t`` in place with ``MAX`` (NaN propagates to every rank)."""
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


# ----------------------------------------------------------------------------------------------
# 8-bit blocks of the whole tensor


@dataclass(frozen=True)
class BlockPiece:
    """Where a rank's rectangular piece of a tensor falls among the tensor's 8-bit quantization blocks.

    One process quantizes a tensor (viewed as ``rows x cols``, a vector as ``n x 1``) in blocks of
    ``block_size`` consecutive elements of its row-major flattening, with one absmax each
    (:mod:`slimtrain.optimizers.moments`). The piece ``rows[0]:rows[1], cols[0]:cols[1]`` touches some of
    those blocks, partly or wholly. Given each block's absmax over the whole tensor (the ``MAX`` all-reduce of
    :meth:`partial_absmax`), :meth:`quantize` gives the piece's elements the codes one process gives them:
    each touched block is laid out in a ``block_size`` buffer with the piece's elements at their offsets and,
    where the block is not wholly in the piece, the block's absmax in a free slot, so that bitsandbytes'
    blockwise quantization of the buffer uses the whole block's absmax.
    """

    shape: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return -(-self.shape[0] * self.shape[1] // self.block_size)

    @property
    def local_shape(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])

    def _layout(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(block of each element, its slot in the buffer, touched blocks, blocks needing their absmax
        injected, the slot it goes to)``, int64 on ``device``: built there once per piece and device, then shared
        by every quantization of the piece (the pieces' owner keeps one ``BlockPiece`` for a step's moments)."""
        layouts = self.__dict__.setdefault("_layouts", {})  # a cache beside the frozen fields
        if device not in layouts:
            layouts[device] = self._build_layout(device)
        return layouts[device]

    def _build_layout(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        rows, cols = self.shape
        r = torch.arange(self.rows[0], self.rows[1], device=device).view(-1, 1)
        c = torch.arange(self.cols[0], self.cols[1], device=device).view(1, -1)
        flat = (r * cols + c).reshape(-1)
        bs = self.block_size
        block = flat // bs
        touched, position = torch.unique(block, sorted=True, return_inverse=True)
        slot = position * bs + flat % bs
        total = rows * cols
        valid = torch.clamp(total - touched * bs, max=bs)  # elements each touched block has in the whole tensor
        mine = torch.bincount(position, minlength=touched.numel())
        partial = (mine < valid).nonzero().reshape(-1)
        taken = torch.zeros(touched.numel() * bs, dtype=torch.bool, device=device)
        taken[slot] = True
        free = (~taken.view(-1, bs)).int().argmax(dim=1)  # the first slot of each block the piece leaves free
        return block, slot, touched, touched[partial], partial * bs + free[partial]

    def partial_absmax(self, x: Tensor) -> Tensor:
        """``max |x|`` of the piece's elements in each of the tensor's blocks (0 for blocks it does not touch;
        a NaN or inf element gives inf), fp32, to be all-reduced with ``MAX``."""
        block = self._layout(x.device)[0]
        a = x.detach().reshape(-1).float().abs().nan_to_num(nan=math.inf)
        out = torch.zeros(self.num_blocks, device=x.device)
        return out.scatter_reduce_(0, block, a, "amax")

    def quantize(self, x: Tensor, absmax: Tensor, quantize_blockwise: Callable) -> Tensor:
        """uint8 codes of the piece ``x`` (fp32, the piece's shape) against the whole tensor's block
        ``absmax``; ``quantize_blockwise(buffer) -> (codes, absmax)`` is one process's quantizer for this
        moment (its map and block size)."""
        _, slot, touched, inject, inject_slot = self._layout(x.device)
        buf = torch.zeros(touched.numel() * self.block_size, device=x.device)
        buf[slot] = x.reshape(-1).float()
        buf[inject_slot] = absmax[inject]
        codes, _ = quantize_blockwise(buf)
        return codes[slot].view(self.local_shape)

    def dequantize(self, codes: Tensor, absmax: Tensor, dequantize_blockwise: Callable) -> Tensor:
        """The fp32 values of the piece's ``codes`` against the whole tensor's block ``absmax``."""
        _, slot, touched, _, _ = self._layout(codes.device)
        buf = torch.zeros(touched.numel() * self.block_size, dtype=torch.uint8, device=codes.device)
        buf[slot] = codes.reshape(-1)
        values = dequantize_blockwise(buf, absmax[touched])
        return values.reshape(-1)[slot].view(self.local_shape)
