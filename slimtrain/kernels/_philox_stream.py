"""The Philox stream that slimtrain's seeded bases come from: its contract, the checks of a request, Philox4x32-10
in torch arithmetic, and the map from 32-bit words to floats, in torch and in Triton. The ops that draw on the stream
build on this module: :mod:`.philox` (materialize, combine, project) and :mod:`.basis_matmul` (matmuls with a
generated basis); their kernels generate the words with Triton's ``tl.randint4x``, the function that
:func:`philox4x32_reference` computes.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validation import check_int
from . import _device, _triton
from ._triton import tl, triton

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


def _to_float(bits: torch.Tensor, s: _Stream) -> torch.Tensor:
    """The word -> float map of the module docstring, in fp32: two exact steps, then mul and add."""
    unit = ((bits >> 8) * 2 + (1 - _TWO_POW_24)).to(torch.float32).mul_(2.0**-24)
    return unit.mul_(s.half).add_(s.center)


if _triton.HAS_TRITON:

    @triton.jit
    def _to_float_tl(bits, half, center):
        """uint32 -> fp32 exactly as :func:`_to_float` (launch with enable_fp_fusion=False)."""
        unit = (2 * (bits >> 8).to(tl.int32) + (1 - 16777216)).to(tl.float32) * 5.9604644775390625e-08
        return unit * half + center


# The multiply and add of the float map must round separately on the GPU too (see the module docstring).
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}
