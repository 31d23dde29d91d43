"""The projector interface shared by every low-rank optimizer.

Every optimizer works in one *oriented* frame: the gradient ``G`` (m x n) is transposed when the
projection is on the left, so that the projected side is always the last dimension. In that frame a
projector owns an ``r x n'`` basis ``B`` with (near-)orthonormal rows and

    low  = G' @ B.T        (m' x r)      project
    full = low @ B         (m' x n')     project back

Adam moments are ``m' x r`` = ``max(m, n) x r`` for ``proj_type='std'``. Transposing does not change an
element-wise optimizer's arithmetic, so GaLore's left projection ``P.T @ G`` gives the same numbers,
transposed.

A projector is a stateless strategy object. Whatever it needs between steps (a basis, indices, a
seed) lives as tensors under ``proj_*`` keys in the optimizer's per-parameter state, so
``torch.load(..., weights_only=True)`` restores it and a resumed run refreshes exactly as the
uninterrupted one would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._seeds import generator, projector_stream_seed
from .._validation import check_choice
from ..state import Slot, counters, projector_slot


#: How a projector that stores its basis (``svd``, ``randomized``) keeps it: ``"fp32"`` (default) or ``"bf16"``,
#: half the bytes (at LLaMA-7B, rank 1024: 1.88 GB of GaLore's state; galore-torch keeps it in the gradient's
#: dtype). The basis is cast back to fp32 for every projection, so only the stored rounding differs.
BASIS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Projector:
    """Base class. Subclasses implement :meth:`refresh` and :meth:`basis`."""

    name: str = ""
    #: Whether :meth:`refresh` reads the gradient's values. One that draws its subspace from its seed alone
    #: (``random``, ``columns``) reads only ``grad_t``'s shape and device, so every rank of a sharded matrix
    #: refreshes on its own, identically.
    reads_gradient: bool = True
    #: Whether :meth:`refresh` picks the subspace from per-column scores of ``grad_t`` that add up over its rows
    #: (:meth:`column_scores`, then :meth:`refresh_from_scores`): ranks holding rows of a matrix then need only
    #: the all-reduce of their scores (DCT).
    scores_by_column: bool = False

    def init_state(self, state: dict, *, seed: int) -> None:
        """Create the projector's entries in ``state`` before the first refresh."""
        state["proj_refreshes"] = torch.zeros((), dtype=torch.int64)
        state["proj_seed"] = torch.tensor(seed, dtype=torch.int64)

    def state_spec(self, rank: int, n: int) -> list[Slot]:
        """The entries :meth:`init_state` and :meth:`refresh` keep for a rank-``rank`` subspace of ``n``-wide
        oriented gradients (see :mod:`slimtrain.optimizers.state`). Subclasses add theirs."""
        return counters("proj_refreshes", "proj_seed")

    def describe_state(self) -> str:
        """What :meth:`state_spec` keeps per matrix besides its counters, in words (the memory calculator prints
        it)."""
        return "the tensors its state_spec declares"

    def refresh(self, grad_t: Tensor, state: dict, rank: int, *, transposed: bool) -> None:
        """Choose a new rank-``rank`` subspace from the oriented fp32 gradient ``grad_t`` (m' x n').

        ``transposed`` says whether ``grad_t`` is the user's gradient transposed; only projectors that
        must reproduce another library bit for bit (SVD vs galore-torch) need it.
        """
        raise NotImplementedError

    def column_scores(self, grad_t: Tensor) -> Tensor:
        """One score per column of ``grad_t``, a sum over its rows (only where :attr:`scores_by_column`)."""
        raise NotImplementedError

    def refresh_from_scores(self, scores: Tensor, state: dict, rank: int) -> None:
        """The refresh :meth:`refresh` makes from the column scores of the whole gradient (only where
        :attr:`scores_by_column`)."""
        raise NotImplementedError

    def basis(self, state: dict, n: int, device: torch.device) -> Tensor:
        """The current ``r x n`` fp32 basis (materialized from compact state if need be)."""
        raise NotImplementedError

    def dense_basis(self, state: dict, n: int, device: torch.device) -> Tensor | None:
        """The basis as a dense matrix for the fused step kernels, or ``None`` where projecting is not a
        matmul (column selection): the optimizer then uses :meth:`project` and :meth:`project_back`."""
        return self.basis(state, n, device)

    def project(self, grad_t: Tensor, state: dict) -> Tensor:
        return grad_t @ self.basis(state, grad_t.shape[1], grad_t.device).T

    def project_back(self, low: Tensor, state: dict, n: int) -> Tensor:
        return low @ self.basis(state, n, low.device)

    # Helpers for subclasses -------------------------------------------------------------------
    @staticmethod
    def _bump(state: dict) -> int:
        """Count a refresh; return the refresh index (0 for the first) used to derive seeds."""
        k = int(state["proj_refreshes"])
        state["proj_refreshes"].fill_(k + 1)
        return k

    @staticmethod
    def _generator(state: dict, k: int, device: torch.device) -> torch.Generator:
        # One independent stream per (parameter seed, refresh index): resume needs nothing but the
        # two integers, and the draw never touches the global RNG.
        return generator(projector_stream_seed(int(state["proj_seed"]), k), device)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class StoredBasisProjector(Projector):
    """A projector that keeps its ``r x n`` basis in state (``proj_basis``), as fp32 or, with
    ``basis_dtype="bf16"``, half the bytes (see :data:`BASIS_DTYPES`). Subclasses compute it in :meth:`refresh`
    and keep it with :meth:`_store_basis`."""

    def __init__(self, basis_dtype: str = "fp32"):
        check_choice("basis_dtype", basis_dtype, tuple(BASIS_DTYPES))
        self.basis_dtype = basis_dtype

    def state_spec(self, rank: int, n: int) -> list[Slot]:
        return [*super().state_spec(rank, n), projector_slot("proj_basis", (rank, n), BASIS_DTYPES[self.basis_dtype])]

    def describe_state(self) -> str:
        return f"{'an' if self.basis_dtype == 'fp32' else 'a'} {self.basis_dtype} r x n basis"

    def basis(self, state: dict, n: int, device: torch.device) -> Tensor:
        """``proj_basis`` as fp32 (a cast, r x n, where it is stored in bf16)."""
        basis = state["proj_basis"]
        return basis if basis.dtype == torch.float32 else basis.float()

    def _store_basis(self, state: dict, basis: Tensor) -> None:
        """Keep an fp32 basis as ``proj_basis`` in the projector's ``basis_dtype``."""
        state["proj_basis"] = basis.to(BASIS_DTYPES[self.basis_dtype]).contiguous()
