"""Where a matrix lives while a rule steps it: here, wholly in this process.

A step rule never assumes it holds the whole matrix. It asks its :class:`~slimtrain.optimizers.rule.MatrixContext`'s
``layout`` for the few operations that depend on where the matrix is: create and update Adam's moments, project
the gradient, refresh the subspace, gather what the back projection needs, and sum a statistic over the
matrix's rows or columns. In one process (:class:`WholeMatrix`) each is the plain single-process operation;
under FSDP2 each rank holds one piece of the matrix, and :class:`slimtrain.optimizers.shard_layout.ShardedMatrix`
implements the same methods with the collectives they need (``docs/fsdp.md``). The rule's arithmetic is
therefore the same code in both.

Everything is in the oriented frame of ``projectors/base.py`` (:meth:`WholeMatrix.oriented`): ``G'`` is
``m' x n'``, the projection contracts ``n'``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .moments import adam_direction, fp32_moments, init_moments
from .state import ADAM, Moment


class WholeMoments:
    """Moments of ``shape`` kept whole (:mod:`slimtrain.optimizers.moments`)."""

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(shape)

    @property
    def local_shape(self) -> tuple[int, ...]:
        """The shape of the moments this process holds: all of ``shape``."""
        return self.shape

    def init(self, state: dict, group: dict, moments: Sequence[Moment], device: torch.device) -> None:
        init_moments(state, group, moments, self.shape, device)

    def adam_direction(self, state: dict, group: dict, grad: Tensor, moments: tuple[Moment, Moment] = ADAM) -> Tensor:
        return adam_direction(state, group, grad, moments)

    def fp32_moments(self, state: dict, group: dict, moments: Sequence[Moment]):
        return fp32_moments(state, group, moments)


class WholeFrame:
    """A whole matrix in the oriented frame, ``shape = (m', n')``."""

    row_local = True

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape

    def moments(self, rank: int) -> WholeMoments:
        """The storage of the ``m' x rank`` moments of the projected gradient."""
        return WholeMoments((self.shape[0], rank))

    def project(self, grad_t: Tensor, basis: Tensor) -> Tensor:
        """``R = G' B^T``."""
        return grad_t @ basis.T

    def refresh(self, projector, grad_t: Tensor, state: dict, rank: int, transposed: bool) -> None:
        projector.refresh(grad_t, state, rank, transposed=transposed)

    def for_back_projection(self, direction: Tensor, low: Tensor, basis: Tensor | None):
        """The rows of the direction and of ``R``, and the columns of the basis, that project back onto this
        process's part of ``G'``: all of them."""
        return direction, low, basis

    def sum_rows(self, t: Tensor) -> Tensor:
        """A statistic summed over ``G'``'s rows, complete here."""
        return t

    def sum_cols(self, t: Tensor) -> Tensor:
        """A per-row statistic summed over ``G'``'s columns, complete here."""
        return t

    def sum_pieces(self, t: Tensor) -> Tensor:
        """A sum over this process's part of ``G'`` (or of a tensor split as it is), completed over every part."""
        return t

    def norm(self, t: Tensor) -> Tensor:
        """The Frobenius norm of the whole of what ``t`` is this process's part of."""
        return torch.linalg.vector_norm(t)

    # What a rule that rewrites the whole weight needs (SST): ---------------------------------------
    @property
    def rows(self) -> tuple[int, int]:
        """The rows of the frame this process holds: all of them."""
        return (0, self.shape[0])

    def column_norms(self, t: Tensor) -> Tensor:
        """The norm of each column of ``t`` (this process's rows of an ``m' x k`` tensor) over all rows, ``1 x k``."""
        return t.norm(dim=0, keepdim=True)

    def gather(self, piece: Tensor) -> Tensor | None:
        """The whole matrix in this frame at the process that decomposes it (here: this one), from this process's
        piece in the user's orientation."""
        return piece

    def broadcast(self, tensors: list[Tensor]) -> None:
        """Give every process the decomposing process's ``tensors`` (here: nothing to do)."""

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on any process holding a piece (here: this one); ``device``: where a message
        about it would go."""
        return flag

    def keep_rows(self, key: str, shape: tuple[int, ...]) -> None:
        """Note that ``state[key]`` holds this process's rows of a tensor of ``shape`` (here: all of them)."""


class WholeMatrix:
    """A parameter of ``shape`` held wholly by this process; projected as its ``m x n`` matrix (the first dimension
    by the product of the others, :func:`~slimtrain.optimizers.rule.matrix_shape`)."""

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.shape[0], math.prod(self.shape[1:]))

    def oriented(self, transposed: bool) -> WholeFrame:
        m, n = self.matrix_shape
        return WholeFrame((n, m) if transposed else (m, n))

    def dense_moments(self) -> WholeMoments:
        """The storage of element-wise moments of the whole parameter, in its own shape (plain AdamW, FRUGAL's
        active blocks)."""
        return WholeMoments(self.shape)

    def split_rows(self) -> tuple[bool, WholeFrame]:
        """``(transposed, frame)``: the frame whose rows are split among the processes holding pieces of the matrix
        (its rows, or its transpose's when its columns are split): here, the matrix itself."""
        return False, self.oriented(False)

    def piece(self, p: Tensor) -> Tensor:
        """This process's piece of the parameter ``p``: all of it."""
        return p
