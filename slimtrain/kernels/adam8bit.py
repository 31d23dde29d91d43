"""Adam on 8-bit blockwise moments in one pass: dequantize, update, take the direction, requantize.

The moments are bitsandbytes' blockwise dynamic quantization (see ``slimtrain/optimizers/moments.py``):
uint8 codes into a sorted 256-entry map, one fp32 absmax per ``block_size`` consecutive elements. The
torch reference dequantizes both moments to fp32 tensors, updates them, and quantizes them back
through bitsandbytes: three full-size fp32 temporaries and about eight passes. The kernel gives each
block one program that holds the block in registers from the codes it reads to the codes it writes.

Rounding. The kernel rounds each normalized value to the nearest code (binary search over the map,
ties to the lower code), as bitsandbytes' CUDA kernels do. bitsandbytes' CPU kernel, which the
reference uses, is not always nearest: about 3% of second-moment codes land one or a few codes away,
and values within ~2e-5 of zero (relative to the block's absmax) get the code 2.1e-5. The two paths
therefore agree to within one code step, not bit for bit (``tests/kernels/test_adam8bit.py`` pins
both facts).

Nothing is written unless every new absmax is finite: a step whose moments overflow fp32 raises
``ValueError`` and leaves the codes and absmax as they were (the new ones are computed aside first).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _bnb, _device, _dispatch, _triton
from ._triton import tl, triton
from .adam import adam_direction_reference, coefficients

if _triton.HAS_TRITON:
    from .adam import adam_moments

OP = "adam8bit_direction"


_OVERFLOW = " (an fp32 overflow)"


def adam8bit_direction_reference(
    grad: Tensor,
    m_codes: Tensor, m_absmax: Tensor, m_map: Tensor,
    v_codes: Tensor, v_absmax: Tensor, v_map: Tensor,
    beta1: float, beta2: float, eps: float, block_size: int,
) -> Tensor:
    """Dequantize, run :func:`~slimtrain.kernels.adam.adam_direction_reference`, requantize (bitsandbytes)."""
    F = _bnb.functional()
    m = F.dequantize_blockwise(m_codes, absmax=m_absmax, code=m_map, blocksize=block_size)
    v = F.dequantize_blockwise(v_codes, absmax=v_absmax, code=v_map, blocksize=block_size)
    direction = adam_direction_reference(grad, m, v, beta1, beta2, eps)
    encoded = []
    for name, value, code in (("exp_avg", m, m_map), ("exp_avg_sq", v, v_map)):
        _bnb.refuse_nonfinite(value, name, "values of the updated moment", _OVERFLOW)
        codes, qstate = F.quantize_blockwise(value.contiguous(), code=code, blocksize=block_size)
        encoded.append((codes, qstate.absmax))
    for (codes, absmax), (dst_codes, dst_absmax) in zip(encoded, ((m_codes, m_absmax), (v_codes, v_absmax))):
        dst_codes.copy_(codes)
        dst_absmax.copy_(absmax)
    return direction


if _triton.HAS_TRITON:

    @triton.jit
    def _nearest_code(x, map_ptr):
        """Index of the map entry nearest to each ``x`` (the map is sorted, 256 entries)."""
        lo = tl.zeros(x.shape, dtype=tl.int32)
        hi = tl.full(x.shape, 255, dtype=tl.int32)
        for _ in tl.static_range(8):  # 255 -> 1 after eight halvings: map[lo] <= x <= map[hi]
            mid = (lo + hi) // 2
            above = x > tl.load(map_ptr + mid)
            lo = tl.where(above, mid, lo)
            hi = tl.where(above, hi, mid)
        closer_lo = tl.abs(x - tl.load(map_ptr + lo)) <= tl.abs(tl.load(map_ptr + hi) - x)
        return tl.where(closer_lo, lo, hi)

    @triton.jit
    def _requantize(x, mask, absmax_ptr, codes_ptr, map_ptr, offs, pid):
        absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
        tl.store(absmax_ptr + pid, absmax)
        # Rounded division: an approximate one could move a value across the midpoint of two codes.
        normalized = tl.where(absmax > 0, tl.div_rn(x, absmax), 0.0)
        tl.store(codes_ptr + offs, _nearest_code(normalized, map_ptr).to(tl.uint8), mask=mask)

    @triton.jit
    def _adam8bit_kernel(
        g_ptr, m_codes_ptr, m_absmax_ptr, m_map_ptr, v_codes_ptr, v_absmax_ptr, v_map_ptr,
        m_codes_out, m_absmax_out, v_codes_out, v_absmax_out, dir_ptr,
        numel, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m_code = tl.load(m_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        v_code = tl.load(v_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
        m = tl.load(m_map_ptr + m_code) * tl.load(m_absmax_ptr + pid)
        v = tl.load(v_map_ptr + v_code) * tl.load(v_absmax_ptr + pid)
        m, v, direction = adam_moments(m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps)
        tl.store(dir_ptr + offs, direction, mask=mask)
        _requantize(m, mask, m_absmax_out, m_codes_out, m_map_ptr, offs, pid)
        _requantize(v, mask, v_absmax_out, v_codes_out, v_map_ptr, offs, pid)


def _adam8bit_triton(grad, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, beta1, beta2, eps, block_size,
                     check_finite):
    new = [torch.empty_like(t) for t in (m_codes, m_absmax, v_codes, v_absmax)]
    direction = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    _adam8bit_kernel[(m_absmax.numel(),)](
        grad, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, *new, direction,
        grad.numel(), *coefficients(beta1, beta2), eps, BLOCK=block_size,
    )
    if check_finite:  # one host read; the optimizers bound their gradients instead (check_finite=False)
        for name, absmax in (("exp_avg", new[1]), ("exp_avg_sq", new[3])):
            _bnb.refuse_nonfinite(absmax, name, "block absmaxes of the updated moment", _OVERFLOW)
    for dst, src in zip((m_codes, m_absmax, v_codes, v_absmax), new):
        dst.copy_(src)
    return direction


def _check(grad, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, block_size) -> None:
    _device.check_same_device(OP, "grad", {
        "grad": grad, "exp_avg": m_codes, "exp_avg absmax": m_absmax, "exp_avg map": m_map,
        "exp_avg_sq": v_codes, "exp_avg_sq absmax": v_absmax, "exp_avg_sq map": v_map,
    })
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"Invalid block_size: {block_size} (expected a power of two)")
    blocks = -(-grad.numel() // block_size)
    for name, codes, absmax, code_map in (("exp_avg", m_codes, m_absmax, m_map), ("exp_avg_sq", v_codes, v_absmax, v_map)):
        if codes.dtype != torch.uint8 or codes.shape != grad.shape or not codes.is_contiguous():
            raise ValueError(
                f"Invalid {name}: {codes.dtype} of shape {tuple(codes.shape)} (expected contiguous torch.uint8 codes "
                f"of the gradient's shape {tuple(grad.shape)})"
            )
        if absmax.dtype != torch.float32 or absmax.numel() != blocks:
            raise ValueError(
                f"Invalid {name} absmax: {absmax.dtype} with {absmax.numel()} elements (expected torch.float32 "
                f"with {blocks}, one per block of {block_size})"
            )
        if code_map.dtype != torch.float32 or code_map.numel() != 256:
            raise ValueError(f"Invalid {name} map: {code_map.dtype} with {code_map.numel()} entries (expected 256 fp32)")


def adam8bit_direction_(
    grad: Tensor,
    m_codes: Tensor, m_absmax: Tensor, m_map: Tensor,
    v_codes: Tensor, v_absmax: Tensor, v_map: Tensor,
    beta1: float, beta2: float, eps: float, block_size: int, *, check_finite: bool = True,
) -> Tensor:
    """One Adam step on 8-bit moments, in place; returns the fp32 direction ``m / (sqrt(v) + eps)``
    computed from the moments before they are requantized.

    ``*_codes`` are uint8 of ``grad``'s shape, ``*_absmax`` fp32 with one entry per block of
    ``block_size`` flattened elements, ``*_map`` the 256-entry sorted maps (signed for ``m``, unsigned
    for ``v``). Triton on CUDA, :func:`adam8bit_direction_reference` elsewhere.

    ``check_finite=False`` skips the Triton path's refusal of an overflowing moment, the one read of a GPU
    value here (a host synchronization). Only for a caller that has bounded the gradient already: the
    optimizers step only when every ``|g| <= 2**63``, so ``g**2 <= 2**126`` and both moments, convex
    combinations of such values, stay finite. The reference (CPU) path always checks.
    """
    args = (grad, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map)
    _check(*args, block_size)
    if _dispatch.choose(OP, grad.device) == "triton":
        return _adam8bit_triton(grad.contiguous(), *args[1:], beta1, beta2, eps, block_size, check_finite)
    return adam8bit_direction_reference(*args, beta1, beta2, eps, block_size)
