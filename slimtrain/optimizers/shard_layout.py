"""A step rule's layout on one rank's piece of a matrix: the sharded counterpart of
:mod:`slimtrain.optimizers.layout`, with the same methods.

:class:`ShardedMatrix` is where a parameter's piece lies (a :class:`~slimtrain.optimizers.shards.MatrixShard` of its
``m x n`` matrix view), :class:`ShardedFrame` that piece in the oriented frame of a projection, and
:class:`PieceMoments` the storage of Adam's moments of a piece (8-bit ones in the blocks of the whole moment). Each
operation is the single-process one completed with the collectives of :mod:`slimtrain.optimizers.shards`, so a
rule's arithmetic is the same code in one process and on a piece (``docs/fsdp.md``). Every method that
communicates is collective over the shard's group.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..kernels.adam import adam_direction_, adam_direction_reference
from .moments import dequantize_blockwise, dynamic_map, quantize_blockwise
from .shards import BlockPiece, MatrixShard, OrientedShard, all_reduce_max_, broadcast_tensors
from .state import ABSMAX_SUFFIX, ADAM, moment_slots


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
        self._pieces: dict[int, BlockPiece] = {}

    def _piece(self, group: dict) -> BlockPiece:
        """The piece among the 8-bit blocks, one for every moment this step loads and stores (its layout is built
        once)."""
        size = group["block_size"]
        if size not in self._pieces:
            self._pieces[size] = BlockPiece(self.shape, self.rows, self.cols, size)
        return self._pieces[size]

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
