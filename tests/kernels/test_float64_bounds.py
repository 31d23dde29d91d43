"""Every optimizer kernel, and its torch reference, against a float64 evaluation of the same formula on the
device under test, within an error bound derived from fp32 rounding of that formula.

The Triton interpreter evaluates scalar arithmetic in higher precision and has no approximate square root
or division, so agreement there says little about a GPU (an fp32 ``1 - beta2`` went unnoticed until a GPU
ran it). Here each computed value is held to a forward error bound, element by element:

* ``u = 2**-24``, fp32's unit roundoff. A product or sum of fp32 values rounds with relative error <= u;
  a coefficient passed as fp32 carries one more u. A square root is held to one ulp (2u): torch's CPU
  ``sqrt`` is faithful, not always nearest (measured here), the kernels round to nearest.
* A length-K fp32 dot product errs by at most ``gamma_K = K u / (1 - K u)`` times the dot product of the
  absolute values, in any summation order (Higham, *Accuracy and Stability*, eq. 3.5). ``tl.dot`` runs
  in "ieee" here, since the bound is for fp32 products (torch's ``allow_tf32`` is off by default).
* A term that went through ``k`` roundings besides a dot product errs by at most ``(gamma_K + k u)`` times
  its magnitude envelope (the same formula over absolute values, computed in float64). Where a sign is
  taken (FRUGAL), the elements whose exact argument lies within its own error bound of zero may flip.

The shapes are odd small ones on every device and, on a GPU, the LLaMA-7B MLP matrix (11008 x 4096,
rank 1024), where a bound with K = 1024 terms is first tested at the size users run.
"""

from __future__ import annotations

import pytest
import torch

from slimtrain import kernels
from slimtrain.kernels.adam import adam_direction_
from slimtrain.kernels.adam8bit import adam8bit_direction_
from slimtrain.kernels.apply import ResidualOperands, lowrank_apply_, residual_row_sq_norms
from slimtrain.kernels.dct_scores import dct_scores
from slimtrain.optimizers.projectors.dct import dct_matrix

from .._device import DEVICE, needs_gpu

U = 2.0**-24
BACKENDS = ["torch", "triton"]
LLAMA_7B_MLP = (11008, 4096, 1024)


def gamma(k: int) -> float:
    return k * U / (1 - k * U)


def _rand(shape, seed, scale=1.0, positive=False):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.rand(shape, generator=g, device=DEVICE) if positive else torch.randn(shape, generator=g, device=DEVICE)
    return x.mul_(scale)


def _assert_within(name: str, actual: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    err = (actual.double() - exact).abs()
    bad = err > bound
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements outside the fp32 bound; worst error "
        f"{float(err.max()):.3g} where the bound is {float(bound.flatten()[int((err - bound).argmax())]):.3g}"
    )


@pytest.fixture(autouse=True)
def _ieee_fp32_matmuls():
    """The bounds are for fp32 products: keep TF32 off (torch's default) for torch and for tl.dot."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


# ----------------------------------------------------------------------------------------- Adam
def adam_exact(g, m0, v0, beta1, beta2, eps):
    """Moments and direction in float64 with the exact coefficients, and their error bounds in fp32."""
    g, m0, v0 = g.double(), m0.double(), v0.double()
    m = beta1 * m0 + (1 - beta1) * g
    v = beta2 * v0 + (1 - beta2) * g * g
    d = m / (v.sqrt() + eps)
    # m: coefficient, product, sum (3u) on each term; one more for an 8-bit moment's dequantization.
    m_bound = 4.01 * U * (beta1 * m0.abs() + (1 - beta1) * g.abs())
    v_bound = 5.01 * U * v  # nonnegative terms; coefficient and two products on g*g, one sum, a dequantization
    denom = v.sqrt() + eps
    # d: m's error through the division, v's halved through the root, then root (2u), eps (u), add, divide.
    d_bound = 1.01 * (m_bound / denom + d.abs() * (v_bound / v.clamp_min(1e-300) / 2 + 5 * U))
    return (m, m_bound), (v, v_bound), (d, d_bound)


ADAM_SHAPES = [(1,), (37, 5), (3, 1001)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [*ADAM_SHAPES, pytest.param(LLAMA_7B_MLP[::2], marks=needs_gpu)],
                         ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else None)
def test_adam_within_fp32_bound_of_float64(shape, dtype, backend):
    g = _rand(shape, 0, 1e-2).to(dtype)
    m, v = _rand(shape, 1, 1e-2), _rand(shape, 2, 1e-4, positive=True)
    # Adam's defaults, and a beta2 whose fp32 complement is far off (fp32(1 - 0.999) vs 1 - fp32(0.999)).
    for beta1, beta2, eps in ((0.9, 0.999, 1e-8), (0.95, 0.9999, 1e-6)):
        (m_x, m_b), (v_x, v_b), (d_x, d_b) = adam_exact(g, m, v, beta1, beta2, eps)
        m_k, v_k = m.clone(), v.clone()
        with kernels.use_backend(backend):
            d_k = adam_direction_(g, m_k, v_k, beta1, beta2, eps)
        _assert_within("exp_avg", m_k, m_x, m_b)
        _assert_within("exp_avg_sq", v_k, v_x, v_b)
        _assert_within("direction", d_k, d_x, d_b)


def test_adam_bound_rejects_an_fp32_complement():
    """The defect a GPU found: ``1 - beta2`` formed in fp32 from fp32(beta2) is 1.3e-5 off for 0.999. The
    bound above must be tight enough to see it (it is 5u, about 3e-7, relative for v)."""
    g, v = _rand((4096,), 0, 1e-2), _rand((4096,), 2, 1e-4, positive=True)
    _, (v_x, v_b), _ = adam_exact(g, torch.zeros_like(g), v, 0.9, 0.999, 1e-8)
    b2 = torch.tensor(0.999, dtype=torch.float32)
    wrong = b2 * v + (1 - b2) * g * g
    assert ((wrong.double() - v_x).abs() > v_b).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(5, 300), pytest.param(LLAMA_7B_MLP[::2], marks=needs_gpu)],
                         ids=lambda s: "x".join(map(str, s)) if isinstance(s, tuple) else None)
def test_adam8bit_direction_within_fp32_bound_of_float64(shape, backend):
    """The direction is computed from the dequantized moments before requantization: the same bound as
    fp32 Adam, starting from the float64 product of code value and block absmax."""
    F = pytest.importorskip("bitsandbytes").functional
    block = 256
    maps = {s: F.create_dynamic_map(signed=s).to(DEVICE) for s in (True, False)}
    g = _rand(shape, 0, 1e-2)
    m_codes = torch.randint(0, 256, shape, dtype=torch.uint8, device=DEVICE)
    v_codes = torch.randint(0, 256, shape, dtype=torch.uint8, device=DEVICE)
    blocks = -(-g.numel() // block)
    m_absmax, v_absmax = _rand((blocks,), 3, 1e-2, positive=True), _rand((blocks,), 4, 1e-4, positive=True)

    def dequantize(codes, absmax, signed):
        values = maps[signed].double()[codes.long().reshape(-1)]
        return (values * absmax.double().repeat_interleave(block)[: values.numel()]).view(shape)

    m0, v0 = dequantize(m_codes, m_absmax, True), dequantize(v_codes, v_absmax, False)
    _, _, (d_x, d_b) = adam_exact(g, m0, v0, 0.9, 0.999, 1e-8)
    with kernels.use_backend(backend):
        d_k = adam8bit_direction_(g, m_codes, m_absmax, maps[True], v_codes, v_absmax, maps[False],
                                  0.9, 0.999, 1e-8, block)
    _assert_within("direction", d_k, d_x, d_b)


# ----------------------------------------------------------------------------------------- apply, norms
APPLY_SHAPES = [(37, 53, 5), (64, 48, 19), pytest.param(LLAMA_7B_MLP, marks=needs_gpu)]


def _apply_case(m, n, r, w_dtype):
    weight = _rand((m, n), 0).to(w_dtype)
    grad = _rand((m, n), 1, 1e-2)
    basis = torch.linalg.qr(_rand((n, r), 2))[0].T.contiguous()
    return weight, grad, basis, grad @ basis.T, _rand((m, r), 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", [None, "identity", "sign"])
@pytest.mark.parametrize("shape", APPLY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lowrank_apply_within_fp32_bound_of_float64(shape, rule, w_dtype, backend):
    m, n, r = shape
    weight, grad, basis, low, direction = _apply_case(m, n, r, w_dtype)
    alpha, beta, coef, d_before, d_after = 1e-3, 1e-4, 0.75, 0.999, 0.9995
    row_scale = _rand((m,), 4, positive=True) if rule == "identity" else None
    W, N, B, G, R = (t.double() for t in (weight, direction, basis, grad, low))
    aB = B.abs()
    update = alpha * (N @ B)
    envelope = abs(alpha) * (N.abs() @ aB)
    exact_flip = torch.zeros_like(W, dtype=torch.bool)
    if rule is not None:
        res = G - coef * (R @ B)
        res_env = G.abs() + coef * (R.abs() @ aB)
        s = 1.0 if row_scale is None else row_scale.double().view(-1, 1)
        if rule == "sign":
            # sign() of a value within its rounding bound of zero may come out either way: 2 |beta s| there.
            exact_flip = res.abs() <= (gamma(r) + 4 * U) * res_env
            res, res_env = res.sign(), torch.ones_like(res)
        update = update + beta * s * res
        envelope = envelope + beta * s * res_env
    exact = d_after * (d_before * W - update)
    # gamma(r) for the products; at most 10 roundings on any one term (coefficients, residual scale and
    # subtraction, the sum of the two terms, the decays before and after).
    bound = (gamma(r) + 12 * U) * d_after * (d_before * W.abs() + envelope)
    bound = torch.where(exact_flip, bound + 2 * d_after * beta, bound)
    if w_dtype != torch.float32:  # rounded once to the weight's dtype
        bound = bound + torch.finfo(w_dtype).eps / 2 * (exact.abs() + bound)
    residual = None if rule is None else ResidualOperands(grad, low, rule == "sign", coef=coef, scale=beta,
                                                          row_scale=row_scale)
    with kernels.use_backend(backend):
        lowrank_apply_(weight, direction, basis, alpha=alpha, residual=residual, decay_before=d_before,
                       decay_after=d_after)
    _assert_within("weight", weight, exact, bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", APPLY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_residual_row_sq_norms_within_fp32_bound_of_float64(shape, backend):
    m, n, r = shape
    _, grad, basis, low, _ = _apply_case(m, n, r, torch.float32)
    coef = 0.75
    G, R, B = grad.double(), low.double(), basis.double()
    res = G - coef * (R @ B)
    e = (gamma(r) + 3 * U) * (G.abs() + coef * (R.abs() @ B.abs()))  # each residual element
    exact = res.square().sum(1)
    # squares of perturbed elements, then an n-term sum of nonnegative values
    bound = (2 * res.abs() * e + e * e).sum(1) + (gamma(n) + U) * (res.abs() + e).square().sum(1)
    with kernels.use_backend(backend):
        got = residual_row_sq_norms(grad, low, basis, coef)
    _assert_within("row_sq_norms", got, exact, bound)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("shape", [(37, 53), (100, 40), pytest.param(LLAMA_7B_MLP[:2], marks=needs_gpu)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dct_scores_within_fp32_bound_of_float64(shape, norm, backend):
    m, n = shape
    grad = _rand(shape, 0, 1e-2)
    dct = dct_matrix(n, DEVICE)
    S = grad.double() @ dct.double().T
    e = gamma(n) * (grad.double().abs() @ dct.double().abs().T)
    if norm == 1:
        exact = S.abs().sum(0)
        bound = e.sum(0) + (gamma(m) + U) * (S.abs() + e).sum(0)
    else:
        exact = S.square().sum(0)
        bound = (2 * S.abs() * e + e * e).sum(0) + (gamma(m) + 2 * U) * (S.abs() + e).square().sum(0)
    with kernels.use_backend(backend):
        got = dct_scores(grad, dct, norm)
    _assert_within("scores", got, exact, bound)
