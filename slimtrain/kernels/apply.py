r"""Project a low-rank step back and apply it to the weight, in place, without the ``m x n`` update.

GaLore-style optimizers end every step with ``update = N @ B`` (a fresh ``m x n`` tensor), a residual
for Fira and FRUGAL (another one or two), then weight decay and the add: four or five full passes and
one or two full-size temporaries. Here each output tile of ``W`` computes its piece of ``N @ B`` (and of
``R @ B`` for the residual) in registers and updates ``W`` once:

.. math::
    W \leftarrow d_{after}\Big(d_{before} W - \alpha\, N B
                 - \beta\, s \odot f\big(G - c\, R B\big)\Big)

with ``N`` Adam's direction in the subspace (``m' x r``), ``B`` the basis (``r x n'``), ``G`` the gradient,
``R = G B^T`` its projection, ``f`` the identity or ``sign`` (:attr:`ResidualOperands.sign`), ``s`` an optional
per-row scale (Fira's :math:`\phi_i` over its limiter) and ``d`` the decoupled weight decay factors
(before the update as in ``torch.optim.AdamW``, after it as in the GaLore code). Everything is in the
optimizer's oriented frame: ``W`` and ``G`` may be transposed views (any strides), and a bf16 ``W`` is
read, updated in fp32 and rounded once to nearest.

Fira also needs the residual's norm before its limiter can scale it; :func:`residual_row_sq_norms`
computes the per-row squares ``sum_j (G - c R B)_{ij}^2`` the same way, again never storing ``R B``.
Two passes over ``R B`` is the price of never storing it, and only the kernel has that to gain: the
torch reference stores the residual anyway, so :func:`residual_with_row_sq_norms` hands it back
there, and :class:`ResidualOperands` carrying it (``materialized``) are applied without computing ``R B``
a second time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _device, _dispatch, _triton
from ._triton import tl, triton

OP = "lowrank_apply"
NORMS_OP = "residual_row_sq_norms"


@dataclass(frozen=True)
class ResidualOperands:
    r"""The operands of the out-of-subspace term :math:`\beta\, s \odot f(G - c\, R B)`, bundled.

    A plain parameter bundle, not a concept: which rule a method applies to the residual, and in which
    words (FRUGAL's ``"sign_sgd"``/``"sgd"``, Fira's rescaled residual), is the optimizers' business
    (:class:`slimtrain.optimizers.functional.Residual`, which builds these). Kernels sit below optimizers
    and never import them, so the kernel takes only what its arithmetic needs: one bit for ``f``.

    Args:
        grad: ``G``, the gradient in the oriented frame (``m' x n'``, any float dtype, any strides).
        low: ``R``, its projection (``m' x r``, fp32).
        sign: ``f`` is ``sign`` (True) or the identity (False, default).
        coef: ``c`` (1 for the orthogonal residual; Fira's code uses its ``scale``).
        scale: ``beta``, the residual's step size in weight units.
        row_scale: ``s``, one fp32 factor per row, or ``None``.
        materialized: ``G - c R B`` already computed, as :func:`residual_with_row_sq_norms` returns it
            on the torch backend (fp32 ``m' x n'``), or ``None``. The torch reference then uses it
            instead of computing ``R B`` again and overwrites it (it is scratch, for one apply); the
            Triton kernel ignores it and recomputes its tiles.
    """

    grad: Tensor
    low: Tensor
    sign: bool = False
    coef: float = 1.0
    scale: float = 1.0
    row_scale: Tensor | None = None
    materialized: Tensor | None = None


# ---------------------------------------------------------------------------------------- reference
def residual_from_back(residual: ResidualOperands, back_low: Tensor | None) -> Tensor:
    """``s * f(G - c * back_low)`` as an fp32 ``m' x n'`` tensor (without ``beta``), given the
    back-projection ``back_low = R B`` however it was computed (consumed in place), or ``None`` to
    start from ``residual.materialized`` (consumed in place instead: no new tensor)."""
    if back_low is not None:
        out = residual.grad.float() - back_low.mul_(residual.coef)
    elif residual.materialized is not None:
        out = residual.materialized
    else:
        raise ValueError("Invalid back_low: None, and the residual has no materialized G - c R B to start from")
    if residual.sign:
        out.sign_()
    if residual.row_scale is not None:
        out.mul_(residual.row_scale.view(-1, 1))
    return out


def residual_reference(residual: ResidualOperands, basis: Tensor) -> Tensor:
    """``s * f(G - c R B)`` as an fp32 ``m' x n'`` tensor (without ``beta``): a new one, or
    ``residual.materialized`` updated in place when the residual carries it."""
    return residual_from_back(residual, None if residual.materialized is not None else residual.low @ basis)


def lowrank_apply_reference(
    weight: Tensor,
    direction: Tensor,
    basis: Tensor,
    alpha: float,
    residual: ResidualOperands | None = None,
    decay_before: float = 1.0,
    decay_after: float = 1.0,
) -> None:
    """The definition, step by step, materializing the update."""
    update = (direction @ basis).mul_(alpha)
    if residual is not None:
        update.add_(residual_reference(residual, basis), alpha=residual.scale)
    target = weight if weight.dtype == torch.float32 else weight.float()
    if decay_before != 1.0:
        target.mul_(decay_before)
    target.sub_(update)
    if decay_after != 1.0:
        target.mul_(decay_after)
    if target is not weight:
        weight.copy_(target)


def _materialize_residual(grad: Tensor, low: Tensor, basis: Tensor, coef: float) -> Tensor:
    """``G - c R B`` as a new fp32 ``m' x n'`` tensor (what :func:`residual_from_back` computes first)."""
    return grad.float() - (low @ basis).mul_(coef)


def residual_row_sq_norms_reference(grad: Tensor, low: Tensor, basis: Tensor, coef: float) -> Tensor:
    """``sum_j (G - c R B)_{ij}^2`` per row, fp32."""
    return _materialize_residual(grad, low, basis, coef).square().sum(1)


# ---------------------------------------------------------------------------------------- kernels
if _triton.HAS_TRITON:

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        """fp32 ``x`` rounded to nearest (ties to even) in ``dtype``. For bf16 the rounding is done on the
        bits first: Triton's interpreter truncates fp32 -> bf16, while torch and the GPU round to nearest."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _tile_product(a_ptr, b_ptr, rm, rn, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      PRECISION: tl.constexpr):
        """``(A @ B)[rm, rn]`` for contiguous ``A`` (M x K) and ``B`` (K x N), fp32."""
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _residual_tile(g_ptr, r_ptr, b_ptr, rm, rn, mask, M, N, K, stride_gm, stride_gn, coef,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        """``(G - c R B)[rm, rn]`` in fp32."""
        back = _tile_product(r_ptr, b_ptr, rm, rn, M, N, K, BM, BN, BK, PRECISION)
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn, mask=mask, other=0.0)
        return g.to(tl.float32) - coef * back

    @triton.jit
    def _lowrank_apply_kernel(
        w_ptr, n_ptr, b_ptr, g_ptr, r_ptr, s_ptr,
        M, N, K, stride_wm, stride_wn, stride_gm, stride_gn,
        alpha, beta, coef, decay_before, decay_after,
        RESIDUAL: tl.constexpr, SIGN: tl.constexpr, ROW_SCALE: tl.constexpr, PRECISION: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        update = alpha * _tile_product(n_ptr, b_ptr, rm, rn, M, N, K, BM, BN, BK, PRECISION)
        if RESIDUAL:
            res = _residual_tile(g_ptr, r_ptr, b_ptr, rm, rn, mask, M, N, K, stride_gm, stride_gn, coef,
                                 BM, BN, BK, PRECISION)
            if SIGN:
                res = tl.where(res > 0, 1.0, tl.where(res < 0, -1.0, 0.0))
            if ROW_SCALE:
                res = res * tl.load(s_ptr + rm, mask=rm < M, other=0.0)[:, None]
            update = update + beta * res
        w_ptrs = w_ptr + rm[:, None] * stride_wm + rn[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        w = (w * decay_before - update) * decay_after
        tl.store(w_ptrs, _round_to(w, w_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _residual_row_sq_norms_kernel(
        out_ptr, g_ptr, r_ptr, b_ptr, M, N, K, stride_gm, stride_gn, coef,
        PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        total = tl.zeros((BM,), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            mask = (rm[:, None] < M) & (rn[None, :] < N)
            res = _residual_tile(g_ptr, r_ptr, b_ptr, rm, rn, mask, M, N, K, stride_gm, stride_gn, coef,
                                 BM, BN, BK, PRECISION)
            total += tl.sum(tl.where(mask, res * res, 0.0), axis=1)
        tl.store(out_ptr + rm, total, mask=rm < M)

    _TILE_CONFIGS = [
        triton.Config({"BM": bm, "BN": bn, "BK": 32}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (32, 64, 4, 2))
    ]
    # Autotuning runs the kernel several times on the real weight: restore it after each trial, or the
    # step would be applied once per trial.
    _lowrank_apply_tuned = triton.autotune(_TILE_CONFIGS, key=["M", "N", "K", "RESIDUAL"], restore_value=["w_ptr"])(
        _lowrank_apply_kernel
    )
    _residual_row_sq_norms_tuned = triton.autotune(
        [triton.Config({"BM": bm, "BN": 64, "BK": 32}, num_warps=4) for bm in (32, 64, 128)], key=["M", "N", "K"]
    )(_residual_row_sq_norms_kernel)

def _launch(tuned, plain, grid_dims, *args, **constexprs):
    if _triton.interpreting():
        tile = _triton.INTERPRETED_MATMUL_TILE
        grid = tuple(triton.cdiv(d, tile[k]) for k, d in grid_dims)
        plain[grid](*args, **constexprs, **tile)
    else:
        tuned[lambda meta: tuple(triton.cdiv(d, meta[k]) for k, d in grid_dims)](*args, **constexprs)


def _lowrank_apply_triton(weight, direction, basis, alpha, residual, decay_before, decay_after) -> None:
    M, N = weight.shape
    K = direction.shape[1]
    res = residual
    g = res.grad if res is not None else weight  # placeholders are never read when RESIDUAL is off
    _launch(
        _lowrank_apply_tuned, _lowrank_apply_kernel, (("BM", M), ("BN", N)),
        weight, direction, basis, g, res.low if res else direction,
        res.row_scale if res is not None and res.row_scale is not None else direction,
        M, N, K, weight.stride(0), weight.stride(1), g.stride(0), g.stride(1),
        alpha, res.scale if res else 0.0, res.coef if res else 0.0, decay_before, decay_after,
        RESIDUAL=res is not None, SIGN=res is not None and res.sign,
        ROW_SCALE=res is not None and res.row_scale is not None, PRECISION=_triton.matmul_precision(),
    )


def _residual_row_sq_norms_triton(grad, low, basis, coef) -> Tensor:
    M, N = grad.shape
    out = torch.empty(M, dtype=torch.float32, device=grad.device)
    _launch(
        _residual_row_sq_norms_tuned, _residual_row_sq_norms_kernel, (("BM", M),),
        out, grad, low, basis, M, N, low.shape[1], grad.stride(0), grad.stride(1), coef,
        PRECISION=_triton.matmul_precision(),
    )
    return out


# ---------------------------------------------------------------------------------------- entry points
def _check_factors(m: int, n: int, low: Tensor, basis: Tensor, low_name: str) -> None:
    if basis.dim() != 2 or basis.shape[1] != n or basis.dtype != torch.float32:
        raise ValueError(
            f"Invalid basis: {basis.dtype} of shape {tuple(basis.shape)} (expected torch.float32 of shape (r, {n}))"
        )
    r = basis.shape[0]
    if low.shape != (m, r) or low.dtype != torch.float32:
        raise ValueError(
            f"Invalid {low_name}: {low.dtype} of shape {tuple(low.shape)} (expected torch.float32 of shape ({m}, {r}))"
        )


def _check_residual(residual: ResidualOperands, m: int, n: int, basis: Tensor) -> None:
    if not isinstance(residual.sign, bool):
        raise ValueError(f"Invalid residual sign: {residual.sign!r} (expected True or False)")
    if residual.grad.shape != (m, n):
        raise ValueError(f"Invalid residual grad: shape {tuple(residual.grad.shape)} (expected ({m}, {n}))")
    _check_factors(m, n, residual.low, basis, "residual low")
    s = residual.row_scale
    if s is not None and (s.shape != (m,) or s.dtype != torch.float32):
        raise ValueError(f"Invalid residual row_scale: {s.dtype} of shape {tuple(s.shape)} (expected torch.float32 ({m},))")
    d = residual.materialized
    if d is not None and (d.shape != (m, n) or d.dtype != torch.float32):
        raise ValueError(
            f"Invalid residual materialized: {d.dtype} of shape {tuple(d.shape)} (expected torch.float32 ({m}, {n}))"
        )


def lowrank_apply_(
    weight: Tensor,
    direction: Tensor,
    basis: Tensor,
    *,
    alpha: float,
    residual: ResidualOperands | None = None,
    decay_before: float = 1.0,
    decay_after: float = 1.0,
) -> None:
    r"""``W <- d_after (d_before W - alpha N B - beta s f(G - c R B))`` in place (see the module docstring).

    Args:
        weight: ``W`` (``m' x n'``, fp32/bf16/fp16, any strides: pass the oriented view of the parameter).
        direction: ``N`` (``m' x r``, fp32).
        basis: ``B`` (``r x n'``, fp32).
        alpha: the subspace step's size in weight units (``scale * lr`` with bias correction).
        residual: the out-of-subspace term, or ``None`` (GaLore).
        decay_before, decay_after: weight-decay factors (1 for none).
    """
    if weight.dim() != 2:
        raise ValueError(f"Invalid weight: {weight.dim()}-D (expected the 2-D oriented view of a matrix)")
    m, n = weight.shape
    _check_factors(m, n, direction, basis, "direction")
    if residual is not None:
        _check_residual(residual, m, n, basis)
    _device.check_same_device(OP, "weight", {
        "weight": weight, "direction": direction, "basis": basis,
        **({} if residual is None else {
            "residual grad": residual.grad, "residual low": residual.low, "residual row_scale": residual.row_scale,
            "residual materialized": residual.materialized,
        }),
    })
    if _dispatch.choose(OP, weight.device) == "triton":
        if residual is not None:
            residual = dataclasses.replace(residual, low=residual.low.contiguous())
        _lowrank_apply_triton(weight, direction.contiguous(), basis.contiguous(), alpha, residual, decay_before,
                              decay_after)
    else:
        lowrank_apply_reference(weight, direction, basis, alpha, residual, decay_before, decay_after)


def residual_with_row_sq_norms(
    grad: Tensor, low: Tensor, basis: Tensor, coef: float = 1.0
) -> tuple[Tensor | None, Tensor]:
    """``(residual, row_sq)``: ``row_sq`` as :func:`residual_row_sq_norms` computes it, and ``residual``
    the fp32 ``m' x n'`` ``G - c R B`` that the torch reference materializes on the way (pass it on as
    :attr:`ResidualOperands.materialized` so the apply reuses it), or ``None`` under the Triton kernel, which
    never stores it."""
    if grad.dim() != 2:
        raise ValueError(f"Invalid grad: {grad.dim()}-D (expected the 2-D oriented gradient)")
    m, n = grad.shape
    _check_factors(m, n, low, basis, "low")
    _device.check_same_device(NORMS_OP, "grad", {"grad": grad, "low": low, "basis": basis})
    if _dispatch.choose(NORMS_OP, grad.device) == "triton":
        return None, _residual_row_sq_norms_triton(grad, low.contiguous(), basis.contiguous(), coef)
    residual = _materialize_residual(grad, low, basis, coef)
    return residual, residual.square().sum(1)


def residual_row_sq_norms(grad: Tensor, low: Tensor, basis: Tensor, coef: float = 1.0) -> Tensor:
    """``sum_j (G - c R B)_{ij}^2`` for each row ``i`` (fp32, length ``m'``), never storing ``R B``
    under the Triton kernel."""
    return residual_with_row_sq_norms(grad, low, basis, coef)[1]
