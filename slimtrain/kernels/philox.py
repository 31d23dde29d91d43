"""Seeded random bases that never have to live in memory: Philox4x32-10 words generated inside the kernels that
consume them, with torch references that produce the same bits on any device. Which counter and lane give each
element of a basis, and how a word becomes a float, is the stream of :mod:`._philox_stream`, beside the Philox
reference that the kernels' ``tl.randint4x`` is checked against.

**Ops**, each dispatched through :mod:`~slimtrain.kernels._dispatch` (Triton on CUDA, the reference
elsewhere, either forceable):

* :func:`philox_bits`: the raw 32-bit words (int64 tensor), for tests and for building other maps;
* :func:`philox_uniform`: materialize bases (RandLoRA's shared bases, NOLA's optional cache);
* :func:`philox_combine`: ``sum_k coef[k] * U_k`` with each ``U_k`` generated in registers (NOLA forward);
* :func:`philox_project`: ``[<grad, U_k>_F for k]``, regenerating the bases again (NOLA backward).

The torch reference of combine/project materializes the bases in chunks of at most
``_REFERENCE_CHUNK`` numbers (never all k at once); the kernels never store them. The ops are not
differentiable (they run under ``no_grad``); NOLA wraps combine and project in one autograd Function.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from . import _device, _dispatch, _triton
from ._philox_stream import (
    _FLOAT_DTYPES,
    _LAUNCH_OPTIONS,
    _MASK32,
    _accumulator_dtype,
    _check_float_tensor,
    _output,
    _stream,
    _Stream,
    _to_float,
    _with_buffer,
    philox4x32_reference,
)
from ._triton import tl, triton

__all__ = ["philox_bits", "philox_uniform", "philox_combine", "philox_project", "philox4x32_reference"]

# The reference materializes at most this many basis elements at a time (4 MB of fp32; the int64 Philox
# state for them is about 8 tensors of a quarter of that many counters, 16 MB).
_REFERENCE_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------- torch reference
def _bits_reference(s: _Stream, first: int, count: int, device) -> torch.Tensor:
    """Words of bases ``first .. first + count`` as an int64 tensor (count, numel)."""
    q = s.quarter
    t = torch.arange(count * q, dtype=torch.int64, device=device) + (s.offset + first * q)
    lanes = philox4x32_reference(t & _MASK32, t >> 32, 0, 0, s.seed & _MASK32, s.seed >> 32)
    return torch.stack(lanes).view(4, count, q).transpose(0, 1).reshape(count, 4 * q)[:, : s.numel]


def _uniform_reference(s: _Stream, first: int, count: int, device) -> torch.Tensor:
    """Bases ``first .. first + count`` as fp32 (count, numel)."""
    return _to_float(_bits_reference(s, first, count, device), s)


def _basis_chunks(s: _Stream) -> Iterator[tuple[int, int]]:
    """(first, count) covering all bases, ``count * numel <= _REFERENCE_CHUNK`` (at least one basis)."""
    per_chunk = max(1, _REFERENCE_CHUNK // s.numel)
    for first in range(0, s.num_basis, per_chunk):
        yield first, min(per_chunk, s.num_basis - first)


def _combine_reference(coef: torch.Tensor, s: _Stream, acc: torch.Tensor) -> None:
    flat = acc.view(-1).zero_()
    for first, count in _basis_chunks(s):
        bases = _uniform_reference(s, first, count, coef.device).to(acc.dtype)
        flat.addmv_(bases.T, coef[first : first + count].to(acc.dtype))


def _project_reference(grad: torch.Tensor, s: _Stream, acc: torch.Tensor) -> None:
    g = grad.reshape(-1).to(acc.dtype)
    for first, count in _basis_chunks(s):
        bases = _uniform_reference(s, first, count, grad.device).to(acc.dtype)
        torch.mv(bases, g, out=acc[first : first + count])


# ----------------------------------------------------------------------------------------- Triton kernels
if _triton.HAS_TRITON:
    from ._philox_stream import _to_float_tl

    @triton.jit
    def _store_lane(row_ptr, pos, live, bits, half, center, RAW: tl.constexpr):
        if RAW:
            tl.store(row_ptr + pos, bits.to(tl.int64), mask=live)  # uint32 -> int64 zero-extends
        else:
            tl.store(row_ptr + pos, _to_float_tl(bits, half, center), mask=live)

    @triton.jit(do_not_specialize=["seed", "offset"])
    def _stream_kernel(out_ptr, seed, offset, numel, quarter, total, half, center,
                       RAW: tl.constexpr, BLOCK: tl.constexpr):
        """out[b, i] for counters t = pid * BLOCK + [0, BLOCK) of ``total = num_basis * quarter``."""
        t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        b = t // quarter
        j = t - b * quarter
        live = t < total
        r0, r1, r2, r3 = tl.randint4x(seed, offset + t)
        row = out_ptr + b * numel
        _store_lane(row, j, live, r0, half, center, RAW)
        _store_lane(row, quarter + j, live & (quarter + j < numel), r1, half, center, RAW)
        _store_lane(row, 2 * quarter + j, live & (2 * quarter + j < numel), r2, half, center, RAW)
        _store_lane(row, 3 * quarter + j, live & (3 * quarter + j < numel), r3, half, center, RAW)

    @triton.jit(do_not_specialize=["seed", "offset"])
    def _combine_kernel(coef_ptr, out_ptr, seed, offset, num_basis, numel, quarter, half, center,
                        BLOCK: tl.constexpr):
        """out[c * Q + j] = sum_k coef[k] * U_k[c * Q + j] for j in this block, c = 0..3: every basis is
        generated in registers, one counter block at a time, and never written."""
        acc_ty = out_ptr.dtype.element_ty
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ctr = offset + j.to(tl.int64)
        acc0 = tl.zeros([BLOCK], acc_ty)
        acc1 = tl.zeros([BLOCK], acc_ty)
        acc2 = tl.zeros([BLOCK], acc_ty)
        acc3 = tl.zeros([BLOCK], acc_ty)
        for k in range(num_basis):
            c = tl.load(coef_ptr + k).to(acc_ty)
            r0, r1, r2, r3 = tl.randint4x(seed, ctr)
            acc0 += c * _to_float_tl(r0, half, center).to(acc_ty)
            acc1 += c * _to_float_tl(r1, half, center).to(acc_ty)
            acc2 += c * _to_float_tl(r2, half, center).to(acc_ty)
            acc3 += c * _to_float_tl(r3, half, center).to(acc_ty)
            ctr += quarter
        live = j < quarter
        tl.store(out_ptr + j, acc0, mask=live)
        tl.store(out_ptr + quarter + j, acc1, mask=live & (quarter + j < numel))
        tl.store(out_ptr + 2 * quarter + j, acc2, mask=live & (2 * quarter + j < numel))
        tl.store(out_ptr + 3 * quarter + j, acc3, mask=live & (3 * quarter + j < numel))

    @triton.jit
    def _lane_product(grad_ptr, pos, live, bits, half, center, acc_ty: tl.constexpr):
        g = tl.load(grad_ptr + pos, mask=live, other=0.0).to(acc_ty)
        return g * _to_float_tl(bits, half, center).to(acc_ty)

    @triton.jit(do_not_specialize=["seed", "offset"])
    def _project_kernel(grad_ptr, out_ptr, seed, offset, numel, quarter, half, center, BLOCK: tl.constexpr):
        """out[k] = <grad, U_k>: program k regenerates basis k block by block and reduces it in a fixed
        order (deterministic, no atomics; one program per basis)."""
        acc_ty = out_ptr.dtype.element_ty
        k = tl.program_id(0)
        first = offset + k.to(tl.int64) * quarter
        acc = tl.zeros([BLOCK], acc_ty)
        for start in range(0, quarter, BLOCK):
            j = start + tl.arange(0, BLOCK)
            live = j < quarter
            r0, r1, r2, r3 = tl.randint4x(seed, first + j)
            acc += _lane_product(grad_ptr, j, live, r0, half, center, acc_ty)
            acc += _lane_product(grad_ptr, quarter + j, live & (quarter + j < numel), r1, half, center, acc_ty)
            acc += _lane_product(grad_ptr, 2 * quarter + j, live & (2 * quarter + j < numel), r2, half, center,
                                 acc_ty)
            acc += _lane_product(grad_ptr, 3 * quarter + j, live & (3 * quarter + j < numel), r3, half, center,
                                 acc_ty)
        tl.store(out_ptr + k, tl.sum(acc, axis=0))


# Counters per program. The interpreter runs one program at a time (about 2 ms each), so it gets big blocks.
def _stream_block() -> int:
    return _triton.tile(1 << 16, 1024)


def _combine_block() -> int:
    return _triton.tile(1 << 14, 128)  # small: the grid is ceil(numel / 4 / BLOCK) programs, each looping over k


def _project_block() -> int:
    return _triton.tile(1 << 14, 512)


def _stream_triton(s: _Stream, out: torch.Tensor, raw: bool) -> None:
    total, block = s.num_basis * s.quarter, _stream_block()
    _stream_kernel[(triton.cdiv(total, block),)](
        out, s.seed, s.offset, s.numel, s.quarter, total, s.half, s.center, RAW=raw, BLOCK=block,
        **_LAUNCH_OPTIONS)


def _combine_triton(coef: torch.Tensor, s: _Stream, acc: torch.Tensor) -> None:
    block = _combine_block()
    _combine_kernel[(triton.cdiv(s.quarter, block),)](
        coef, acc, s.seed, s.offset, s.num_basis, s.numel, s.quarter, s.half, s.center, BLOCK=block,
        **_LAUNCH_OPTIONS)


def _project_triton(grad: torch.Tensor, s: _Stream, acc: torch.Tensor) -> None:
    _project_kernel[(s.num_basis,)](
        grad, acc, s.seed, s.offset, s.numel, s.quarter, s.half, s.center, BLOCK=_project_block(),
        **_LAUNCH_OPTIONS)


# ----------------------------------------------------------------------------------------- launchers
def _result_shape(s: _Stream, num_basis: int | None) -> tuple[int, ...]:
    return s.shape if num_basis is None else (num_basis, *s.shape)


@torch.no_grad()
def philox_bits(seed: int, shape: Sequence[int], *, num_basis: int | None = None, offset: int = 0,
                device: torch.device | str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The raw 32-bit words of the stream (module docstring) as an int64 tensor with values in [0, 2^32).

    Args:
        seed (int): in [0, 2**63 - 1].
        shape (tuple of int): shape of one basis.
        num_basis (int, optional): return ``(num_basis, *shape)``, basis b in ``[b]``; None: one basis, ``shape``.
        offset (int, default 0): first counter; basis b starts at ``offset + b * ceil(numel / 4)``.
        device: where to generate (default CPU). out (Tensor, optional): int64 result tensor to fill.
    """
    s = _stream(seed, shape, -1.0, 1.0, 1 if num_basis is None else num_basis, offset)
    device = _device.canonical(device if device is not None else "cpu")
    out = _output(out, _result_shape(s, num_basis), torch.int64, device)
    if _dispatch.choose("philox_bits", device) == "triton":
        _stream_triton(s, out, raw=True)
    else:
        for first, count in _basis_chunks(s):
            out.view(s.num_basis, s.numel)[first : first + count] = _bits_reference(s, first, count, device)
    return out


@torch.no_grad()
def philox_uniform(seed: int, shape: Sequence[int], low: float = -1.0, high: float = 1.0, *,
                   num_basis: int | None = None, offset: int = 0, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """Materialize U(low, high) bases from ``seed``: the same bits on every device and backend.

    Generated directly on ``device`` (a GPU user never builds bases on CPU and copies them). Values are
    computed in fp32 and rounded once to ``dtype`` by torch.

    Args:
        seed (int): in [0, 2**63 - 1].
        shape (tuple of int): shape of one basis.
        low, high (float, default -1, 1): the interval; values lie in [low, high].
        num_basis (int, optional): return ``(num_basis, *shape)``, exactly the bases that
            :func:`philox_combine` and :func:`philox_project` use; None: one basis of ``shape``.
        offset (int, default 0): first counter (see the module docstring).
        device (default CPU), dtype (default float32), out (optional result tensor of that shape and dtype).
    """
    s = _stream(seed, shape, low, high, 1 if num_basis is None else num_basis, offset)
    device = _device.canonical(device if device is not None else "cpu")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"Invalid dtype: {dtype} (expected one of {', '.join(map(str, _FLOAT_DTYPES))})")
    out = _output(out, _result_shape(s, num_basis), dtype, device)
    if _dispatch.choose("philox_uniform", device) == "triton":
        return _with_buffer(out, torch.float32, lambda buf: _stream_triton(s, buf, raw=False))

    def reference(buf: torch.Tensor) -> None:
        for first, count in _basis_chunks(s):
            buf.view(s.num_basis, s.numel)[first : first + count] = _uniform_reference(s, first, count, device)

    return _with_buffer(out, torch.float32, reference)


@torch.no_grad()
def philox_combine(coef: torch.Tensor, seed: int, shape: Sequence[int], low: float = -1.0, high: float = 1.0,
                   *, offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_k coef[k] * U_k`` over the ``coef.numel()`` bases of ``shape`` (NOLA's forward).

    The kernel generates each ``U_k`` in registers and accumulates in fp32 (fp64 for fp64 ``coef``): no basis
    is ever written to memory. Equals ``torch.tensordot(coef, philox_uniform(seed, shape, low, high,
    num_basis=coef.numel(), offset=offset), 1)`` up to summation order.

    Args:
        coef (Tensor): 1-D, float32/float64/float16/bfloat16; the result has its dtype and device.
        seed, shape, low, high, offset: as in :func:`philox_uniform`. out (Tensor, optional): result tensor.
    """
    _check_float_tensor("coef", coef)
    if coef.dim() != 1 or coef.numel() == 0:
        raise ValueError(f"Invalid coef: shape {tuple(coef.shape)} (expected a 1-D tensor of at least one "
                         f"coefficient)")
    s = _stream(seed, shape, low, high, coef.numel(), offset)
    out = _output(out, s.shape, coef.dtype, coef.device)
    if _dispatch.choose("philox_combine", coef.device) == "triton":
        compute = lambda acc: _combine_triton(coef.contiguous(), s, acc)  # noqa: E731
    else:
        compute = lambda acc: _combine_reference(coef, s, acc)  # noqa: E731
    return _with_buffer(out, _accumulator_dtype(coef.dtype), compute)


@torch.no_grad()
def philox_project(grad: torch.Tensor, seed: int, num_basis: int, low: float = -1.0, high: float = 1.0, *,
                   offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[<grad, U_k>_F for k < num_basis]`` with ``U_k`` the bases of ``grad.shape`` (NOLA's backward:
    dL/dcoef[k] = <dL/dM, U_k>). The adjoint of :func:`philox_combine`; the kernel regenerates the bases in
    registers, one program per basis, accumulating in fp32 (fp64 for fp64 ``grad``).

    Args:
        grad (Tensor): float32/float64/float16/bfloat16, any shape; the result has its dtype and device.
        seed, num_basis, low, high, offset: as in :func:`philox_uniform`. out (Tensor, optional): result.
    """
    _check_float_tensor("grad", grad)
    s = _stream(seed, tuple(grad.shape), low, high, num_basis, offset)
    out = _output(out, (num_basis,), grad.dtype, grad.device)
    if _dispatch.choose("philox_project", grad.device) == "triton":
        compute = lambda acc: _project_triton(grad.contiguous(), s, acc)  # noqa: E731
    else:
        compute = lambda acc: _project_reference(grad, s, acc)  # noqa: E731
    return _with_buffer(out, _accumulator_dtype(grad.dtype), compute)
