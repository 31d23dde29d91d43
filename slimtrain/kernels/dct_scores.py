r"""DCT selection scores without the ``m x n`` product: ``score_j = sum_i |(G C^T)_{ij}|^p``.

The SVD-free projector (``optimizers/projectors/dct.py``) ranks the ``n`` DCT-II directions by how
much of the gradient each one carries, the column norms (L1 by default, or squared L2) of
``S = G C^T``. Materializing ``S`` costs ``m x n`` floats at every refresh; the kernel computes ``S``
tile by tile and reduces each tile into the column scores at once, so only ``n`` floats are written
per split of the rows.

Row splits keep a wide matrix's GPU busy (``n / BN`` column tiles alone can be fewer programs than the
device has cores); each split writes its own partial scores and the splits are summed after, so the
result does not depend on scheduling order (no atomics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _device, _dispatch, _triton
from ._triton import tl, triton

OP = "dct_scores"
NORMS = (1, 2)


def dct_scores_reference(grad: Tensor, dct: Tensor, norm: int) -> Tensor:
    """Column scores of ``grad @ dct.T`` (L1, or squared L2), fp32."""
    s = grad.float() @ dct.T
    return s.abs().sum(0) if norm == 1 else s.square().sum(0)


if _triton.HAS_TRITON:

    @triton.jit
    def _dct_scores_kernel(
        out_ptr, g_ptr, c_ptr, M, N, stride_gm, stride_gn, rows_per_split,
        L1: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        split = tl.program_id(1)
        row_start = split * rows_per_split
        row_end = tl.minimum(row_start + rows_per_split, M)
        scores = tl.zeros((BN,), dtype=tl.float32)
        for m0 in range(row_start, row_end, BM):
            rm = m0 + tl.arange(0, BM)
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, N, BK):
                rk = k0 + tl.arange(0, BK)
                g = tl.load(g_ptr + rm[:, None] * stride_gm + rk[None, :] * stride_gn,
                            mask=(rm[:, None] < row_end) & (rk[None, :] < N), other=0.0).to(tl.float32)
                # C^T tile: element (k, j) is C[j, k].
                c = tl.load(c_ptr + rn[None, :] * N + rk[:, None], mask=(rk[:, None] < N) & (rn[None, :] < N),
                            other=0.0)
                acc = tl.dot(g, c, acc, input_precision=PRECISION)
            scores += tl.sum(tl.abs(acc) if L1 else acc * acc, axis=0)
        tl.store(out_ptr + split * N + rn, scores, mask=rn < N)


def _dct_scores_triton(grad: Tensor, dct: Tensor, norm: int, splits: int | None = None) -> Tensor:
    M, N = grad.shape
    tile = _triton.tile(_triton.INTERPRETED_MATMUL_TILE, {"BM": 64, "BN": 64, "BK": 32})
    meta = _triton.tile({}, {"num_warps": 4, "num_stages": 3})
    if splits is None:
        splits = 1 if _triton.interpreting() else max(1, min(8, M // 512))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), tile["BM"]) * tile["BM"]
    splits = triton.cdiv(M, rows_per_split)
    partial = torch.empty(splits, N, dtype=torch.float32, device=grad.device)
    _dct_scores_kernel[(triton.cdiv(N, tile["BN"]), splits)](
        partial, grad, dct, M, N, grad.stride(0), grad.stride(1), rows_per_split,
        L1=norm == 1, PRECISION=_triton.matmul_precision(), **tile, **meta,
    )
    return partial.sum(0)


def dct_scores(grad: Tensor, dct: Tensor, norm: int = 1) -> Tensor:
    """Scores of the ``n`` DCT directions for the oriented gradient ``grad`` (``m x n``, any float dtype,
    any strides), given the orthonormal DCT-II matrix ``dct`` (``n x n`` fp32, rows are directions):
    ``sum_i |(grad @ dct.T)_ij|`` for ``norm=1``, the same of squares for ``norm=2``."""
    if norm not in NORMS:
        raise ValueError(f"Invalid norm: {norm!r} (expected 1 or 2)")
    if grad.dim() != 2:
        raise ValueError(f"Invalid grad: {grad.dim()}-D (expected the 2-D oriented gradient)")
    n = grad.shape[1]
    if dct.shape != (n, n) or dct.dtype != torch.float32:
        raise ValueError(f"Invalid dct: {dct.dtype} of shape {tuple(dct.shape)} (expected torch.float32 ({n}, {n}))")
    _device.check_same_device(OP, "grad", {"grad": grad, "dct": dct})
    if _dispatch.choose(OP, grad.device) == "triton":
        return _dct_scores_triton(grad, dct.contiguous(), norm)
    return dct_scores_reference(grad, dct, norm)
