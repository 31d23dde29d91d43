"""Matmuls with a Philox basis as one operand, the basis generated inside the kernel and never stored.

RandLoRA's shared basis ``B`` is as large as the largest weight it adapts, and every use of it is a matmul
(``x B^T`` in forward, ``g B`` in backward, ``B A`` for the dense update). Here ``U`` is the 2-D basis
of ``shape = (R, C)`` that ``philox_uniform(seed, shape, low, high, offset=offset)`` materializes (the
stream of :mod:`._philox_stream`), and the two ops read a leading block ``U[:rows, :cols]`` of it:

* :func:`philox_linear`: ``x @ U[:rows, :cols]^T``, ``x`` (..., cols) -> (..., rows), like ``F.linear``;
* :func:`philox_matmul`: ``x @ U[:rows, :cols]``, ``x`` (..., rows) -> (..., cols), its adjoint
  (the backward of one is the other).

Numerics (both backends): each element of ``U`` is the fp32 value of the stream rounded once to ``x``'s
dtype (as ``philox_uniform(..., dtype=x.dtype)`` gives it), products are accumulated in fp32 (fp64 for
fp64 ``x``) and the result is rounded once to ``x``'s dtype. So the ops equal the matmul with the
materialized basis up to summation order.

The cost of never storing ``U``: the kernel regenerates every element of its tile of ``U`` (one Philox
call, four words of which it keeps one, since the stream spreads a counter's words over four quarters of
the basis) in every program that reads it, i.e. ``ceil(M / BM)`` times for ``M`` rows of ``x``. The
torch reference (CPU) regenerates ``U`` in row chunks of at most ``_REFERENCE_CHUNK`` elements per call;
on CPU that costs far more than reading a stored basis (docs/kernels.md gives measured numbers), so
RandLoRA stores ``B`` unless asked not to (``cache_bases=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validation import check_int
from . import _dispatch, _triton
from ._triton import tl, triton
from ._philox_stream import (
    _LAUNCH_OPTIONS,
    _MASK32,
    _accumulator_dtype,
    _check_float_tensor,
    _stream,
    _Stream,
    _to_float,
    _with_buffer,
    philox4x32_reference,
)

__all__ = ["philox_linear", "philox_matmul", "philox_elements_reference"]

# The reference regenerates at most this many basis elements at a time. Each element costs a Philox call
# of its own (about ten int64 temporaries of the chunk's size: ~1.5 MB here). Smaller chunks were also
# faster in a one-off timing on a 2-core CPU (1536 x 384 basis, 512 rows of x, one thread): 0.15 s per call
# with 2^14, 0.16 s with 2^16, 0.24 s with 2^18.
_REFERENCE_CHUNK = 1 << 14


# ----------------------------------------------------------------------------------------- torch reference
def philox_elements_reference(s: _Stream, index: torch.Tensor) -> torch.Tensor:
    """The 32-bit words (int64) of basis 0 of ``s`` at flat, row-major ``index`` (an int64 tensor): element
    ``i`` is lane ``i // Q`` of counter ``offset + i mod Q`` (the stream of :mod:`._philox_stream`)."""
    q = s.quarter
    lane = torch.div(index, q, rounding_mode="floor")
    t = index - lane * q + s.offset
    words = torch.stack(philox4x32_reference(t & _MASK32, t >> 32, 0, 0, s.seed & _MASK32, s.seed >> 32))
    return words.gather(0, lane.unsqueeze(0)).squeeze(0)


def _row_chunks(rows: int, cols: int):
    per_chunk = max(1, _REFERENCE_CHUNK // cols)
    for first in range(0, rows, per_chunk):
        yield first, min(per_chunk, rows - first)


def _basis_rows(s: _Stream, first: int, count: int, cols: int, dtype: torch.dtype, acc: torch.dtype,
                device) -> torch.Tensor:
    """``U[first:first + count, :cols]`` rounded to ``dtype``, then widened to ``acc`` (exactly)."""
    row = torch.arange(first, first + count, dtype=torch.int64, device=device)
    index = (row[:, None] * s.shape[1] + torch.arange(cols, dtype=torch.int64, device=device)).reshape(-1)
    return _to_float(philox_elements_reference(s, index), s).view(count, cols).to(dtype).to(acc)


def _linear_reference(x2: torch.Tensor, s: _Stream, rows: int, cols: int, out: torch.Tensor) -> None:
    xa = x2.to(out.dtype)
    for first, count in _row_chunks(rows, cols):
        u = _basis_rows(s, first, count, cols, x2.dtype, out.dtype, x2.device)
        torch.mm(xa, u.T, out=out[:, first : first + count])


def _matmul_reference(x2: torch.Tensor, s: _Stream, rows: int, cols: int, out: torch.Tensor) -> None:
    xa = x2.to(out.dtype)
    out.zero_()
    for first, count in _row_chunks(rows, cols):
        u = _basis_rows(s, first, count, cols, x2.dtype, out.dtype, x2.device)
        out.addmm_(xa[:, first : first + count], u)


# ----------------------------------------------------------------------------------------- Triton kernel
if _triton.HAS_TRITON:
    from .apply import _round_to
    from ._philox_stream import _to_float_tl

    @triton.jit
    def _basis_tile(index, seed, offset, quarter, half, center):
        """fp32 values of the basis at flat ``index`` (int64): lane ``index // Q`` of counter
        ``offset + index mod Q``."""
        lane = index // quarter
        r0, r1, r2, r3 = tl.randint4x(seed, offset + index - lane * quarter)
        bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
        return _to_float_tl(bits, half, center)

    @triton.jit(do_not_specialize=["seed", "offset"])
    def _basis_matmul_kernel(
        x_ptr, out_ptr, M, N, K, stride_xm, stride_xk, seed, offset, quarter, row_len, half, center,
        LINEAR: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        """``out (M x N) = x (M x K) @ V`` with ``V[k, n] = U[n, k]`` (LINEAR) or ``U[k, n]``, each tile of
        ``U`` generated in registers. ``out`` is contiguous, fp32 (fp64 for fp64 ``x``).

        Half-precision operands are widened to fp32 and multiplied in "tf32": tf32 holds every bf16 and
        fp16 value exactly, so the products are exact and accumulate in fp32, as a half-precision tensor
        core dot would, and the interpreter (which has no bf16 arithmetic) computes the same thing."""
        acc_ty = out_ptr.dtype.element_ty
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=acc_ty)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            kn_mask = (rk[:, None] < K) & (rn[None, :] < N)
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                         mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(acc_ty)
            if LINEAR:
                index = rn[None, :].to(tl.int64) * row_len + rk[:, None]
            else:
                index = rk[:, None].to(tl.int64) * row_len + rn[None, :]
            v = tl.where(kn_mask, _basis_tile(index, seed, offset, quarter, half, center), 0.0)
            v = _round_to(v, x_ptr.dtype.element_ty).to(acc_ty)
            acc = tl.dot(xt, v, acc, input_precision=PRECISION, out_dtype=acc_ty)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    _basis_matmul_tuned = triton.autotune(
        [
            triton.Config({"BM": bm, "BN": bn, "BK": 32}, num_warps=w, num_stages=st)
            for bm, bn, w, st in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3))
        ],
        key=["M", "N", "K", "LINEAR"],
    )(_basis_matmul_kernel)


def _matmul_triton(x2: torch.Tensor, s: _Stream, linear: bool, out: torch.Tensor) -> None:
    M, K = x2.shape
    N = out.shape[1]
    args = (x2, out, M, N, K, x2.stride(0), x2.stride(1), s.seed, s.offset, s.quarter, s.shape[1], s.half,
            s.center)
    # fp64 multiplies in "ieee"; fp32 follows torch's rule; half types are exact in "tf32" (kernel docstring).
    precision = {torch.float64: "ieee", torch.float32: _triton.matmul_precision()}.get(x2.dtype, "tf32")
    if _triton.interpreting():
        tile = _triton.INTERPRETED_MATMUL_TILE
        grid = (triton.cdiv(M, tile["BM"]), triton.cdiv(N, tile["BN"]))
        _basis_matmul_kernel[grid](*args, LINEAR=linear, PRECISION=precision, **tile, **_LAUNCH_OPTIONS)
    else:
        _basis_matmul_tuned[lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))](
            *args, LINEAR=linear, PRECISION=precision, **_LAUNCH_OPTIONS)


# ----------------------------------------------------------------------------------------- launchers
def _block(shape, rows, cols) -> tuple[int, int]:
    dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
    if dims is None or len(dims) != 2:
        raise ValueError(f"Invalid shape: {shape!r} (expected the 2-D shape (R, C) of the basis)")
    rows = dims[0] if rows is None else rows
    cols = dims[1] if cols is None else cols
    for name, value, limit in (("rows", rows, dims[0]), ("cols", cols, dims[1])):
        check_int(name, value, minimum=1, maximum=limit)
    return rows, cols


def _run(op: str, x: torch.Tensor, seed, shape, low, high, rows, cols, offset, linear: bool) -> torch.Tensor:
    _check_float_tensor("x", x)
    s = _stream(seed, shape, low, high, 1, offset)  # validates the shape's dims too
    rows, cols = _block(shape, rows, cols)
    k, n = (cols, rows) if linear else (rows, cols)
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"Invalid x: shape {tuple(x.shape)} (expected (..., {k}): the basis block is "
                         f"U[:{rows}, :{cols}])")
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return out
    if _dispatch.choose(op, x.device) == "triton":
        compute = lambda acc: _matmul_triton(x2, s, linear, acc.view(-1, n))  # noqa: E731
    elif linear:
        compute = lambda acc: _linear_reference(x2, s, rows, cols, acc.view(-1, n))  # noqa: E731
    else:
        compute = lambda acc: _matmul_reference(x2, s, rows, cols, acc.view(-1, n))  # noqa: E731
    return _with_buffer(out, _accumulator_dtype(x.dtype), compute)


@torch.no_grad()
def philox_linear(x: torch.Tensor, seed: int, shape: Sequence[int], low: float = -1.0, high: float = 1.0, *,
                  rows: int | None = None, cols: int | None = None, offset: int = 0) -> torch.Tensor:
    """``x @ U[:rows, :cols]^T`` for the basis ``U = philox_uniform(seed, shape, low, high, offset=offset)``
    without ever storing ``U`` (module docstring): ``x`` (..., cols) -> (..., rows).

    Args:
        x (Tensor): float32/float64/float16/bfloat16, any leading dims; the result has its dtype and device.
        seed (int), low, high (float), offset (int): the stream, as in :func:`~.philox.philox_uniform`.
        shape (tuple of 2 ints): ``(R, C)``, the full basis whose leading block is used.
        rows, cols (int, optional): the block, default the whole basis.
    """
    return _run("philox_linear", x, seed, shape, low, high, rows, cols, offset, linear=True)


@torch.no_grad()
def philox_matmul(x: torch.Tensor, seed: int, shape: Sequence[int], low: float = -1.0, high: float = 1.0, *,
                  rows: int | None = None, cols: int | None = None, offset: int = 0) -> torch.Tensor:
    """``x @ U[:rows, :cols]``, the adjoint of :func:`philox_linear`: ``x`` (..., rows) -> (..., cols).
    Arguments as in :func:`philox_linear`."""
    return _run("philox_matmul", x, seed, shape, low, high, rows, cols, offset, linear=False)
