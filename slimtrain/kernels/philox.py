"""Seeded random bases that never have to live in memory: counter-based Philox4x32-10 generated inside the
kernels that consume them, with a torch reference that produces the same bits on any device.

Why a counter-based generator: NOLA's k bases of shape (r, in) are a pure function of (seed, counter), so a
kernel can regenerate any element where it is needed, in forward and again in backward, instead of reading
(or storing) k x r x in numbers. ``torch.Generator`` streams are sequential and differ between CPU and CUDA;
Philox does not: the Triton kernel (``tl.randint4x``) and the int64 torch reference below compute the same
function, so bases are bit-identical on CPU and GPU.

**The stream (the contract every op and both implementations follow).** Basis ``b`` (``0 <= b <
num_basis``) of ``shape`` has ``N = prod(shape)`` elements and uses ``Q = ceil(N / 4)`` Philox counters.
Element ``i`` (row-major) is lane ``i // Q`` of ::

    Philox4x32-10(key = (seed mod 2^32, seed >> 32),
                  counter = (t mod 2^32, t >> 32, 0, 0)),   t = offset + b * Q + (i mod Q)

i.e. the four 32-bit outputs of one counter fill four contiguous quarters of the basis (so a kernel block
of counters writes four contiguous segments, no interleaving). A 32-bit word ``x`` maps to a float in two
exact steps and two correctly rounded ones::

    m = x >> 8                                    (top 24 bits)
    s = (2 m + 1 - 2^24) * 2^-24                  exact in fp32: s in (-1, 1), symmetric, never 0
    v = s * half + center                         half = (high - low) / 2, center = (high + low) / 2, in fp32

``v`` lies in [low, high] (rounding can reach an end point, as with ``torch.rand``), with mean ``center``.
The multiply and the add round separately in both implementations: the kernels are launched with
``enable_fp_fusion=False`` so the compiler cannot contract them into one FMA (which rounds once).
For ``low = -high`` (every basis slimtrain uses) ``v = s * high`` is a single rounding.

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

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .._validation import check_int
from . import _device, _dispatch, _triton
from ._triton import tl, triton

__all__ = ["philox_bits", "philox_uniform", "philox_combine", "philox_project", "philox4x32_reference"]

_MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"), as in
# Random123 and triton/language/random.py.
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
_TWO_POW_24 = 1 << 24
_MAX_SEED = (1 << 63) - 1
_MAX_COUNTER = (1 << 63) - 1  # the kernels add counters in int64
_MAX_NUMEL = (1 << 31) - 1  # per basis: the kernels index within a basis in int32
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# The reference materializes at most this many basis elements at a time (4 MB of fp32; the int64 Philox
# state for them is about 8 tensors of a quarter of that many counters, 16 MB).
_REFERENCE_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class _Stream:
    """A validated request: ``num_basis`` bases of ``shape`` from (seed, offset), mapped to [low, high]."""

    seed: int
    shape: tuple[int, ...]
    num_basis: int
    offset: int
    half: float  # exactly representable in fp32, so both implementations multiply by the same number
    center: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def quarter(self) -> int:
        """Q: counters per basis (each counter yields four 32-bit words)."""
        return -(-self.numel // 4)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fp32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


def _stream(seed, shape, low, high, num_basis, offset) -> _Stream:
    """Check every user-facing argument once, with the parameter name and value in each message."""
    check_int("seed", seed, minimum=0, maximum=_MAX_SEED)
    dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
    if not dims or not all(_is_int(d) and d >= 1 for d in dims) or math.prod(dims) > _MAX_NUMEL:
        raise ValueError(f"Invalid shape: {shape!r} (expected a non-empty tuple of positive ints with at most "
                         f"2**31 - 1 elements)")
    check_int("num_basis", num_basis, minimum=1)
    for name, value in (("low", low), ("high", high)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"Invalid {name}: {value!r} (expected a finite float)")
    if not low < high:
        raise ValueError(f"Invalid high: {high!r} (expected a float > low = {low!r})")
    check_int("offset", offset, minimum=0)
    half, center = _fp32((high - low) / 2), _fp32((high + low) / 2)
    if not (math.isfinite(half) and math.isfinite(center)):
        raise ValueError(f"Invalid low, high: {low!r}, {high!r} (expected an interval representable in float32)")
    stream = _Stream(seed, dims, num_basis, offset, half, center)
    span = num_basis * stream.quarter
    if offset + span > _MAX_COUNTER:
        raise ValueError(
            f"Invalid offset: {offset!r} (expected offset + num_basis * ceil(numel / 4) <= 2**63 - 1; this "
            f"request uses {span} counters)"
        )
    return stream


def _check_float_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype not in _FLOAT_DTYPES:
        got = f"a tensor of dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"Invalid {name}: {got} (expected a float32, float64, float16 or bfloat16 tensor)")


def _output(out, shape, dtype, device) -> torch.Tensor:
    """``out`` if it fits the result exactly, a new tensor if it is None; anything else is an error."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if (tuple(out.shape) != tuple(shape) or out.dtype != dtype or not _device.same_device(out.device, device)
            or not out.is_contiguous()):
        raise ValueError(
            f"Invalid out: shape {tuple(out.shape)}, dtype {out.dtype} on {out.device} (expected a contiguous "
            f"tensor of shape {tuple(shape)}, dtype {dtype} on {_device.canonical(device)})"
        )
    return out


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); fp32, fp16 and bf16 accumulate in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _with_buffer(out: torch.Tensor, dtype: torch.dtype, compute) -> torch.Tensor:
    """Run ``compute(buffer)`` on ``out`` itself when it has ``dtype``, else on a ``dtype`` buffer copied into
    ``out`` with torch's rounding. Kernels only ever store fp32/fp64: Triton's interpreter truncates
    fp32 -> bf16 where the GPU rounds to nearest even, so a downcast inside a kernel would break bit-identity."""
    if out.dtype == dtype:
        compute(out)
        return out
    buffer = torch.empty(out.shape, dtype=dtype, device=out.device)
    compute(buffer)
    return out.copy_(buffer)


# ----------------------------------------------------------------------------------------- torch reference
def _mul_hi_lo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * x`` (a < 2^32 a constant, x holding uint32 values in int64).

    The full product needs 64 unsigned bits, more than int64 holds, so the constant is split into 16-bit
    halves and both partial products stay below 2^48 (no reliance on signed overflow wrapping). In-place
    steps on the fresh partial products: this is the CPU path's hot loop.
    """
    p_hi, p_lo = x * (a >> 16), x * (a & 0xFFFF)  # a * x = p_hi * 2^16 + p_lo
    lo = (p_hi & 0xFFFF).bitwise_left_shift_(16).add_(p_lo).bitwise_and_(_MASK32)
    hi = p_lo.bitwise_right_shift_(16).add_(p_hi).bitwise_right_shift_(16)
    return hi, lo


def philox4x32_reference(c0, c1, c2, c3, k0: int, k1: int, rounds: int = _ROUNDS):
    """Philox4x32 in int64 torch arithmetic: counters ``c0..c3`` (int64 tensors of uint32 values, or ints)
    and key ``(k0, k1)`` to four int64 tensors of uint32 values. The same rounds as Random123's
    ``philox4x32`` and Triton's ``philox_impl`` (checked against Random123's known-answer vectors).
    Runs on the device of the tensor counters (CPU if all four are ints); int counters are filled in there."""
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), torch.device("cpu"))
    c0, c1, c2, c3 = torch.broadcast_tensors(*(
        c.to(torch.int64) if isinstance(c, torch.Tensor) else torch.full((), c, dtype=torch.int64, device=device)
        for c in (c0, c1, c2, c3)
    ))
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _bits_reference(s: _Stream, first: int, count: int, device) -> torch.Tensor:
    """Words of bases ``first .. first + count`` as an int64 tensor (count, numel)."""
    q = s.quarter
    t = torch.arange(count * q, dtype=torch.int64, device=device) + (s.offset + first * q)
    lanes = philox4x32_reference(t & _MASK32, t >> 32, 0, 0, s.seed & _MASK32, s.seed >> 32)
    return torch.stack(lanes).view(4, count, q).transpose(0, 1).reshape(count, 4 * q)[:, : s.numel]


def _to_float(bits: torch.Tensor, s: _Stream) -> torch.Tensor:
    """The word -> float map of the module docstring, in fp32: two exact steps, then mul and add."""
    unit = ((bits >> 8) * 2 + (1 - _TWO_POW_24)).to(torch.float32).mul_(2.0**-24)
    return unit.mul_(s.half).add_(s.center)


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

    @triton.jit
    def _to_float_tl(bits, half, center):
        """uint32 -> fp32 exactly as :func:`_to_float` (launch with enable_fp_fusion=False)."""
        unit = (2 * (bits >> 8).to(tl.int32) + (1 - 16777216)).to(tl.float32) * 5.9604644775390625e-08
        return unit * half + center

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


# The multiply and add of the float map must round separately on the GPU too (see the module docstring).
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


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
