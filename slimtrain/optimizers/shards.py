"""Sharded-matrix maths that every sharding engine shares: a matrix cut into one ``torch.chunk`` piece per
rank along one dimension, and the collectives a low-rank step needs on it.

Nothing here knows which engine made the pieces: :mod:`slimtrain.optimizers.dtensor` describes an FSDP2
``DTensor`` parameter as a :class:`MatrixShard`, and another engine whose pieces are whole rows or columns can do
the same. :class:`ShardedMatrix` (with :class:`ShardedFrame` and :class:`PieceMoments`) is a step rule's layout on
such a piece, the counterpart of :class:`~slimtrain.optimizers.layout.WholeMatrix`. ``docs/fsdp.md`` explains the
design; in short, in the oriented frame of ``optimizers/projectors/base.py`` (``G'`` is ``m' x n'``, the
projection contracts ``n'``):

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.adam import adam_direction_, adam_direction_reference
from .moments import dequantize_blockwise, dynamic_map, quantize_blockwise
from .state import ABSMAX_SUFFIX, ADAM, moment_slots


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

    def moment_shape(self, r: int) -> tuple[int, int]:
        start, stop = self.rows
        return (stop - start, r)

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
    (:mod:`slimtrain.optimizers.quantized`). The piece ``rows[0]:rows[1], cols[0]:cols[1]`` touches some of
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

    @cached_property
    def _layout(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(block of each element, its slot in the buffer, touched blocks, blocks needing their absmax
        injected, the slot it goes to)``, all int64 on the CPU."""
        rows, cols = self.shape
        r = torch.arange(self.rows[0], self.rows[1]).view(-1, 1)
        c = torch.arange(self.cols[0], self.cols[1]).view(1, -1)
        flat = (r * cols + c).reshape(-1)
        bs = self.block_size
        block = flat // bs
        touched, position = torch.unique(block, sorted=True, return_inverse=True)
        slot = position * bs + flat % bs
        total = rows * cols
        valid = torch.clamp(total - touched * bs, max=bs)  # elements each touched block has in the whole tensor
        mine = torch.bincount(position, minlength=touched.numel())
        partial = (mine < valid).nonzero().reshape(-1)
        taken = torch.zeros(touched.numel() * bs, dtype=torch.bool)
        taken[slot] = True
        free = (~taken.view(-1, bs)).int().argmax(dim=1)  # the first slot of each block the piece leaves free
        return block, slot, touched, touched[partial], partial * bs + free[partial]

    def partial_absmax(self, x: Tensor) -> Tensor:
        """``max |x|`` of the piece's elements in each of the tensor's blocks (0 for blocks it does not touch;
        a NaN or inf element gives inf), fp32, to be all-reduced with ``MAX``."""
        block = self._layout[0].to(x.device)
        a = x.detach().reshape(-1).float().abs().nan_to_num(nan=math.inf)
        out = torch.zeros(self.num_blocks, device=x.device)
        return out.scatter_reduce_(0, block, a, "amax")

    def quantize(self, x: Tensor, absmax: Tensor, quantize_blockwise: Callable) -> Tensor:
        """uint8 codes of the piece ``x`` (fp32, the piece's shape) against the whole tensor's block
        ``absmax``; ``quantize_blockwise(buffer) -> (codes, absmax)`` is one process's quantizer for this
        moment (its map and block size)."""
        _, slot, touched, inject, inject_slot = (t.to(x.device) for t in self._layout)
        buf = torch.zeros(touched.numel() * self.block_size, device=x.device)
        buf[slot] = x.reshape(-1).float()
        buf[inject_slot] = absmax[inject]
        codes, _ = quantize_blockwise(buf)
        return codes[slot].view(self.local_shape)

    def dequantize(self, codes: Tensor, absmax: Tensor, dequantize_blockwise: Callable) -> Tensor:
        """The fp32 values of the piece's ``codes`` against the whole tensor's block ``absmax``."""
        _, slot, touched, _, _ = (t.to(codes.device) for t in self._layout)
        buf = torch.zeros(touched.numel() * self.block_size, dtype=torch.uint8, device=codes.device)
        buf[slot] = codes.reshape(-1)
        values = dequantize_blockwise(buf, absmax[touched])
        return values.reshape(-1)[slot].view(self.local_shape)


# ----------------------------------------------------------------------------------------------
# Moments on a piece


class PieceMoments:
    """Adam's moments of a tensor of global ``shape`` (``rows x cols``) of which this rank holds the piece
    ``rows[0]:rows[1], cols[0]:cols[1]``: the storage a sharded step keeps them in, as
    :mod:`slimtrain.optimizers.moments` keeps a whole tensor's.

    fp32 moments are the piece's own (Adam is element-wise). Whether a moment is 8-bit is decided on the whole
    tensor's size (``min_8bit_size``), as one process decides it; an 8-bit moment holds the piece's codes and
    every block's absmax (replicated: ``1/block_size`` of the moment) and is requantized against each block's
    absmax over all ranks (one ``MAX`` all-reduce per update), so its codes are one process's
    (:class:`BlockPiece`). Every method that updates 8-bit moments is collective over ``group``.
    """

    def __init__(self, shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int], group: Any = None,
                 created: dict | None = None, *, dim: int = 0, whole_shape=None, local_shape=None):
        self.shape, self.rows, self.cols, self.group = tuple(shape), rows, cols, group
        self.created = {} if created is None else created
        # The moments' own shape (a convolution's, not its matrix view's) and the dimension it is split along.
        self.whole_shape = self.shape if whole_shape is None else tuple(whole_shape)
        self.dim = dim
        self.local_shape = (rows[1] - rows[0], cols[1] - cols[0]) if local_shape is None else tuple(local_shape)

    def _piece(self, group: dict) -> BlockPiece:
        return BlockPiece(self.shape, self.rows, self.cols, group["block_size"])

    def init(self, state: dict, group: dict, moments, device: torch.device) -> None:
        """Zero ``moments``, declared as one process declares them for the whole tensor: this rank's piece of each,
        and every block's absmax of an 8-bit one."""
        for slot in moment_slots(group, moments, self.shape):
            if slot.kind == "absmax":
                state[slot.key] = torch.zeros(slot.shape, device=device)
                continue
            if slot.dtype == torch.uint8:  # the code that decodes to 0
                zero_code = int(dynamic_map(slot.signed).abs().argmin())
                state[slot.key] = torch.full(self.local_shape, zero_code, dtype=torch.uint8, device=device)
            else:
                state[slot.key] = torch.zeros(self.local_shape, dtype=slot.dtype, device=device)
            self.created[slot.key] = (self.whole_shape, self.dim)

    @staticmethod
    def _quantized(state: dict, m) -> bool:
        return state[m.key].dtype == torch.uint8

    def _load(self, state: dict, group: dict, m) -> Tensor:
        def dequantize(codes, absmax):
            return dequantize_blockwise(codes, absmax, signed=m.signed, block_size=group["block_size"])

        codes = state[m.key].reshape(self._piece(group).local_shape)
        return self._piece(group).dequantize(codes, state[m.key + ABSMAX_SUFFIX], dequantize).view(self.local_shape)

    def _store(self, state: dict, group: dict, moments, values: list[Tensor]) -> None:
        """Requantize ``values`` (fp32 pieces) against the blocks' absmax over all ranks, every moment in one
        all-reduce; a non-finite absmax (on any rank) is refused on every rank, before anything is written."""
        piece = self._piece(group)
        absmax = all_reduce_max_(torch.stack([piece.partial_absmax(v) for v in values]), self.group)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError("Invalid 8-bit moment: its update holds NaN or inf (an fp32 overflow) on some rank; "
                             "nothing was written")
        codes = [piece.quantize(v.reshape(piece.local_shape), a, lambda buf, signed=m.signed: quantize_blockwise(
            buf, signed=signed, block_size=group["block_size"])) for m, v, a in zip(moments, values, absmax)]
        for m, c, a in zip(moments, codes, absmax):
            state[m.key].copy_(c.view(self.local_shape))
            state[m.key + ABSMAX_SUFFIX].copy_(a)

    def adam_direction(self, state: dict, group: dict, grad: Tensor, moments=None) -> Tensor:
        """Update the moments of this rank's piece from its gradient ``grad`` and return Adam's direction there:
        one process's ``adam_direction`` on the whole tensor, element for element."""
        moments = ADAM if moments is None else moments
        beta1, beta2 = group["betas"]
        first, second = moments
        if not self._quantized(state, first):
            return adam_direction_(grad, state[first.key], state[second.key], beta1, beta2, group["eps"])
        m, v = self._load(state, group, first), self._load(state, group, second)
        direction = adam_direction_reference(grad, m, v, beta1, beta2, group["eps"])
        self._store(state, group, moments, [m, v])
        return direction

    @contextmanager
    def fp32_moments(self, state: dict, group: dict, moments) -> Iterator[list[Tensor]]:
        """Yield the pieces of ``moments`` as fp32 tensors to update in place; store them back on exit (8-bit
        ones requantized collectively), as one process's ``fp32_moments``."""
        values = [self._load(state, group, m) if self._quantized(state, m) else state[m.key] for m in moments]
        yield values
        stored = [(m, v) for m, v in zip(moments, values) if self._quantized(state, m)]
        if stored:
            self._store(state, group, [m for m, _ in stored], [v for _, v in stored])


# ----------------------------------------------------------------------------------------------
# A rank's piece of a parameter, as a step rule sees it (the counterpart of slimtrain.optimizers.layout)


class ShardedFrame:
    """This rank's piece of a matrix in the oriented frame of a projection: the sharded counterpart of
    :class:`~slimtrain.optimizers.layout.WholeFrame`, with the same methods (see ``docs/fsdp.md``)."""

    def __init__(self, oriented: OrientedShard, owner: int, created: dict):
        self.o, self.owner, self._created = oriented, owner, created

    @property
    def shape(self) -> tuple[int, int]:
        return self.o.shape

    @property
    def row_local(self) -> bool:
        return self.o.row_local

    def moments(self, rank: int) -> PieceMoments:
        """The storage of this rank's rows of the ``m' x rank`` moments."""
        return PieceMoments((self.shape[0], rank), self.o.rows, (0, rank), self.o.shard.group, self._created, dim=0)

    def project(self, grad_t: Tensor, basis: Tensor) -> Tensor:
        return self.o.project(grad_t, basis)

    def refresh(self, projector, grad_t: Tensor, state: dict, rank: int, transposed: bool) -> None:
        """A new subspace, the same on every rank: drawn from the seed alone where the projector reads no gradient;
        from column scores summed over the ranks' rows where it picks by them (DCT, row-local); else from the whole
        gradient gathered at the matrix's owner, which broadcasts the projector's state."""
        if not projector.reads_gradient:
            projector.refresh(grad_t.new_zeros(()).expand(self.shape), state, rank, transposed=transposed)
            return
        if self.row_local and projector.scores_by_column:
            scores = self.o.sum_(projector.column_scores(grad_t))
            projector.refresh_from_scores(scores, state, rank)
            return
        whole = self.o.gather_to(self.owner, self.o.orient(grad_t))
        slots = projector.state_spec(rank, self.shape[1])
        if whole is not None:
            projector.refresh(whole, state, rank, transposed=transposed)
        else:  # new tensors, as the owner's refresh makes: the old basis may still be read (moments="rotate")
            for slot in slots:
                device = "cpu" if slot.host else grad_t.device
                state[slot.key] = torch.empty(slot.shape, dtype=slot.dtype, device=device)
        broadcast_tensors([state[s.key] for s in slots], self.owner, self.o.shard.group, grad_t.device)

    def for_back_projection(self, direction: Tensor, low: Tensor, basis: Tensor | None):
        if self.row_local:
            return direction, low, basis
        direction, low = self.o.rows_for_back_projection(direction, low)
        return direction, low, self.o.local_basis(basis)

    def sum_rows(self, t: Tensor) -> Tensor:
        return self.o.sum_(t) if self.row_local else t

    def sum_cols(self, t: Tensor) -> Tensor:
        return t if self.row_local else self.o.sum_(t)

    def sum_pieces(self, t: Tensor) -> Tensor:
        return self.o.sum_(t)

    def norm(self, t: Tensor) -> Tensor:
        return self.o.sum_(t.float().square().sum()).sqrt()

    @property
    def rows(self) -> tuple[int, int]:
        return self.o.rows

    def column_norms(self, t: Tensor) -> Tensor:
        return self.o.sum_(t.square().sum(0, keepdim=True)).sqrt()

    def gather(self, piece: Tensor) -> Tensor | None:
        return self.o.gather_to(self.owner, piece)

    def broadcast(self, tensors: list[Tensor]) -> None:
        broadcast_tensors(tensors, self.owner, self.o.shard.group)

    def any(self, flag: bool, device: torch.device) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        return bool(all_reduce_max_(t, self.o.shard.group).item() > 0)

    def keep_rows(self, key: str, shape: tuple[int, ...]) -> None:
        self._created[key] = (tuple(shape), 0)


class ShardedMatrix:
    """A rank's piece of a parameter of ``shape`` (a :class:`MatrixShard` of its ``m x n`` matrix view), as a step
    rule sees it: the sharded counterpart of :class:`~slimtrain.optimizers.layout.WholeMatrix`. ``owner`` is the
    rank that refreshes its subspace from the whole gradient. :attr:`created` records the state this step
    created in pieces (key -> (whole shape, split dimension)), for the engine to wrap them."""

    def __init__(self, shape, shard: MatrixShard, owner: int, local_shape):
        self.shape, self.shard, self.owner, self.local_shape = tuple(shape), shard, owner, tuple(local_shape)
        self.created: dict[str, tuple[tuple[int, ...], int]] = {}

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shard.shape

    def oriented(self, transposed: bool) -> ShardedFrame:
        return ShardedFrame(self.shard.oriented(transposed), self.owner, self.created)

    def split_rows(self) -> tuple[bool, ShardedFrame]:
        """``(transposed, frame)``: the frame whose rows are this rank's (the matrix's, or its transpose's)."""
        transposed = self.shard.dim == 1
        return transposed, self.oriented(transposed)

    def piece(self, p: Tensor) -> Tensor:
        """This rank's piece of the ``DTensor`` parameter ``p`` (its storage)."""
        return p.to_local()

    def dense_moments(self) -> PieceMoments:
        """Element-wise moments of the parameter, this rank's piece of each, in the piece's own shape."""
        start, stop = self.shard.bounds[self.shard.rank]
        m, n = self.shard.shape
        rows, cols = ((start, stop), (0, n)) if self.shard.dim == 0 else ((0, m), (start, stop))
        return PieceMoments((m, n), rows, cols, self.shard.group, self.created, dim=self.shard.dim,
                            whole_shape=self.shape, local_shape=self.local_shape)
