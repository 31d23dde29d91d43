"""Adam's moment update and direction in one pass: read g, m, v; write m, v and m / (sqrt(v) + eps).

In a low-rank optimizer this runs on the projected gradient (``m' x r``), in a dense one on the whole
gradient. The torch reference takes four passes over memory (``mul_``, ``add_``, ``addcmul_``, the
division) plus a temporary for ``sqrt(v) + eps``; the kernel reads three tensors and writes three,
once. A bf16 or fp16 gradient is read as it is and upcast in registers, so no fp32 copy of it is made.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _device, _dispatch, _triton
from ._triton import tl, triton

OP = "adam_direction"


def adam_direction_reference(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, eps: float
) -> Tensor:
    r"""Update both fp32 moments in place and return :math:`m_t / (\sqrt{v_t} + \epsilon)`.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2
    """
    grad = grad.float()
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    return exp_avg / exp_avg_sq.sqrt().add_(eps)


if _triton.HAS_TRITON:

    @triton.jit
    def adam_moments(m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps):
        """fp32 moments and direction in registers. Every coefficient arrives rounded once from the host's
        double (fp32(1 - beta2), never 1 - fp32(beta2), which is 1.3e-5 off for beta2 = 0.999), and the
        square root and division round to nearest, as torch's do (``tl.sqrt`` and ``/`` are approximate
        on a GPU; the interpreter hides both)."""
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        return m, v, tl.div_rn(m, tl.sqrt_rn(v) + eps)

    @triton.jit
    def _adam_direction_kernel(g_ptr, m_ptr, v_ptr, out_ptr, numel, beta1, one_minus_beta1, beta2, one_minus_beta2,
                               eps, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        m, v, direction = adam_moments(m, v, g, beta1, one_minus_beta1, beta2, one_minus_beta2, eps)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(out_ptr + offs, direction, mask=mask)

    # Memory-bound: the block size and warps that keep enough loads in flight differ by GPU and size.
    # Tuning runs the kernel several times on the real moments: restore them after each trial.
    _adam_direction_tuned = triton.autotune(
        [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8), (8192, 16))],
        key=["numel"], restore_value=["m_ptr", "v_ptr"],
    )(_adam_direction_kernel)


def _adam_direction_triton(grad, exp_avg, exp_avg_sq, beta1, beta2, eps) -> Tensor:
    out = torch.empty_like(exp_avg)
    numel = exp_avg.numel()
    args = (grad, exp_avg, exp_avg_sq, out, numel, *coefficients(beta1, beta2), eps)
    if _triton.interpreting():  # one program at a time, about 2 ms each: few, large blocks
        _adam_direction_kernel[(triton.cdiv(numel, 16384),)](*args, BLOCK=16384)
    else:
        _adam_direction_tuned[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](*args)
    return out


def coefficients(beta1: float, beta2: float) -> tuple[float, float, float, float]:
    """``(beta1, 1 - beta1, beta2, 1 - beta2)`` formed in double on the host; the launch rounds each to fp32
    once, as torch does with the ``alpha``/``value`` of the reference's ``add_``/``addcmul_``."""
    beta1, beta2 = float(beta1), float(beta2)
    return beta1, 1.0 - beta1, beta2, 1.0 - beta2


def _check(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    _device.check_same_device(OP, "grad", {"grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq})
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32:
            raise ValueError(f"Invalid {name}: dtype {t.dtype} (expected torch.float32)")
        if t.shape != grad.shape:
            raise ValueError(f"Invalid {name}: shape {tuple(t.shape)} (expected the gradient's {tuple(grad.shape)})")
        if not t.is_contiguous():
            raise ValueError(f"Invalid {name}: a non-contiguous tensor (optimizer state is updated in place, flat)")
    if not grad.is_floating_point():
        raise ValueError(f"Invalid grad: dtype {grad.dtype} (expected a floating-point tensor)")


def adam_direction_(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
    """Update ``exp_avg``/``exp_avg_sq`` (fp32, ``grad``'s shape) in place from ``grad`` (any float
    dtype) and return Adam's direction as a new fp32 tensor, without bias correction (which lives in
    the step size). Triton on CUDA, :func:`adam_direction_reference` elsewhere."""
    _check(grad, exp_avg, exp_avg_sq)
    if _dispatch.choose(OP, grad.device) == "triton":
        return _adam_direction_triton(grad.contiguous(), exp_avg, exp_avg_sq, beta1, beta2, eps)
    return adam_direction_reference(grad, exp_avg, exp_avg_sq, beta1, beta2, eps)
