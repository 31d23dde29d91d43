"""8-bit moments and bf16 stochastic rounding: quantization error, bitsandbytes as oracle, refresh
policies on quantized moments, checkpoints, and the rounding's expectation.

The generic matrix (CONFIGS in helpers.py) also runs its 8-bit rows through exact resume, NaN safety
and the low-precision dtype tests.
"""

import hashlib
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtrain.optimizers import (
    OPTIMIZERS,
    DCTAdamW8bit,
    FrugalAdamW8bit,
    GaLoreAdamW,
    GaLoreAdamW8bit,
)
from slimtrain.optimizers.layout import WholeMatrix
from slimtrain.optimizers.moments import dequantize_blockwise, dynamic_map, num_blocks, quantize_blockwise
from slimtrain.optimizers.state import ABSMAX_SUFFIX
from slimtrain.optimizers.updates import bf16_stochastic_round

from .helpers import CONFIGS, groups, mlp, train

bnb = pytest.importorskip("bitsandbytes")

EIGHT_BIT = [c for c in CONFIGS if "8bit" in c[0]]

# bitsandbytes' map is a sorted list of 256 fp32 values; the largest gap is in the top decade
# (0.1..1 split into 64 steps signed, 128 unsigned).
MAX_GAP = {True: 0.0140625, False: 0.00703125}
# bitsandbytes' CPU kernel does not always pick the nearest code: values within ~2e-5 of zero
# (relative to the block's absmax), exact zeros included, come back as the code 2.125e-5 (signed) or
# 1.5625e-5 (unsigned). Measured over 2e5 values log-uniform across 9 decades, the worst distance
# beyond the nearest code is 3.01e-5 (signed) and 3.006e-5 (unsigned); 4e-5 covers it with margin.
CPU_SLACK = 4e-5


def _moment_keys(state):
    return [k for k in state if k.startswith("exp_avg") and not k.endswith(ABSMAX_SUFFIX)]


# ----------------------------------------------------------------------------------------------
# The quantizer


def test_dynamic_maps_are_pinned():
    # Checkpoints store codes, not the map: a different map upstream would reinterpret them.
    digests = {
        signed: hashlib.sha256(dynamic_map(signed).numpy().tobytes()).hexdigest()[:16] for signed in (True, False)
    }
    assert digests[True] == "e732639a65f497b4"
    assert digests[False] == hashlib.sha256(
        bnb.functional.create_dynamic_map(signed=False).numpy().tobytes()
    ).hexdigest()[:16]
    for signed in (True, False):
        code = dynamic_map(signed)
        assert torch.equal(code, code.sort().values) and code.max() == 1.0
        assert code.diff().max() <= MAX_GAP[signed] + 1e-7


@settings(max_examples=60, deadline=None, database=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    exponent=st.integers(-25, 25),  # with the 1e12 outlier, stays below fp32's 3.4e38
    signed=st.booleans(),
    block_size=st.sampled_from([64, 256]),
    zero_block=st.booleans(),
    outlier=st.sampled_from([0.0, 1e6, -1e12]),
    poison=st.sampled_from([None, None, float("nan"), float("inf")]),
    seed=st.integers(0, 2**16),
)
def test_quantization_error_is_bounded(shape, exponent, signed, block_size, zero_block, outlier, poison, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10.0**exponent
    if not signed:
        x = x.abs()
    flat = x.view(-1)
    if zero_block:
        flat[:block_size].zero_()
    if outlier and flat.numel() > 1:
        flat[-1] = abs(outlier) * 10.0**exponent if not signed else outlier * 10.0**exponent
    if poison is not None:
        flat[seed % flat.numel()] = poison
        with pytest.raises(ValueError, match="NaN or inf"):
            quantize_blockwise(x, signed=signed, block_size=block_size)
        return
    codes, absmax = quantize_blockwise(x, signed=signed, block_size=block_size)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.numel() == num_blocks(x.numel(), block_size)
    y = dequantize_blockwise(codes, absmax, signed=signed, block_size=block_size)
    assert y.shape == x.shape and torch.isfinite(y).all()

    blocks = torch.arange(flat.numel()) // block_size
    scale = absmax[blocks]
    # The absmax is the block's max |x| (exactly), so every block is bounded by its own values only:
    # an outlier costs precision in its block and nowhere else.
    ref = torch.zeros(absmax.numel()).scatter_reduce(0, blocks, flat.abs(), "amax")
    assert torch.equal(absmax, ref)
    err = (y.view(-1) - flat).abs()
    assert (err <= scale * (MAX_GAP[signed] / 2 + CPU_SLACK)).all(), (err / scale).max()
    zero = (ref == 0)[blocks]
    assert (y.view(-1)[zero] == 0).all()  # an all-zero block has absmax 0 and decodes to exactly 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_refuses_nonfinite_and_writes_nothing(bad):
    x = torch.randn(1000)
    codes, absmax = quantize_blockwise(x, signed=True)
    codes0, absmax0 = codes.clone(), absmax.clone()
    x[17] = bad
    with pytest.raises(ValueError, match=r"1 of 1000 values are NaN or inf; 8-bit optimizer state never stores"):
        quantize_blockwise(x, signed=True, out=codes, absmax=absmax)
    assert torch.equal(codes, codes0) and torch.equal(absmax, absmax0)


def test_round_trip_matches_bitsandbytes():
    x = torch.randn(3, 1000) * torch.logspace(-6, 2, 1000)
    for signed in (True, False):
        v = x if signed else x.abs()
        codes, absmax = quantize_blockwise(v, signed=signed)
        ref_codes, ref_state = bnb.functional.quantize_blockwise(
            v, code=bnb.functional.create_dynamic_map(signed=signed), blocksize=256
        )
        assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_state.absmax)


# ----------------------------------------------------------------------------------------------
# Optimizers


@pytest.mark.parametrize("factory", [c[1] for c in EIGHT_BIT], ids=[c[0] for c in EIGHT_BIT])
def test_8bit_rows_really_store_codes(factory):
    model = mlp()
    opt = factory(groups(model))
    train(model, opt, steps=3)
    moments = [(st, k) for st in opt.state.values() for k in _moment_keys(st)]
    assert moments
    for st, k in moments:
        assert st[k].dtype == torch.uint8, k
        absmax = st[k + ABSMAX_SUFFIX]
        assert absmax.dtype == torch.float32 and absmax.numel() == num_blocks(st[k].numel(), opt.defaults["block_size"])


def test_small_moments_stay_fp32_below_threshold():
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 8))  # 8192 and 512 elements
    opt = GaLoreAdamW8bit(model.parameters(), lr=1e-3)  # no rank: plain AdamW, threshold 4096
    model(torch.randn(4, 128)).sum().backward()
    opt.step()
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8
    assert opt.state[model[1].weight]["exp_avg"].dtype == torch.float32
    assert opt.state[model[0].bias]["exp_avg_sq"].dtype == torch.float32
    assert "exp_avg_absmax" not in opt.state[model[1].weight]


def test_constructor_option_equals_8bit_class():
    a, b = mlp(), mlp()
    opt_a = GaLoreAdamW8bit(groups(a), lr=1e-2, min_8bit_size=0)
    opt_b = GaLoreAdamW(groups(b), lr=1e-2, min_8bit_size=0, state_bits=8)
    train(a, opt_a, steps=8)
    train(b, opt_b, steps=8)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert {"galore8bit", "fira8bit", "frugal8bit", "dct8bit", "sst8bit"} <= set(OPTIMIZERS)


def test_plain_adamw_8bit_matches_bitsandbytes():
    """The no-``rank`` path in 8 bits against ``bnb.optim.AdamW8bit`` on CPU, same gradients.

    Both dequantize with the same map and block size 256, update the moments with the same fp32 ops
    and requantize with the same kernel, so the codes and absmax must agree exactly. The weights
    differ only in where the arithmetic puts the bias correction (ours: step size
    ``lr sqrt(1-b2^t)/(1-b1^t)`` times ``m / (sqrt(v) + eps)``, galore-torch's form; bnb: ``lr/(1-b1^t)``
    times ``m / (sqrt(v)/sqrt(1-b2^t) + eps)``). With ``eps=0`` these are the same number up to
    rounding: a few fp32 ulps of an update of size ~lr per step, so 8 steps at lr 1e-3 stay within
    1e-7 of each other; atol 1e-6 leaves 10x margin and is still 1000x below one step.
    """
    torch.manual_seed(0)
    ours_model = torch.nn.Linear(128, 64)  # weight 8192 elements: quantized by both; bias 64: fp32 in both
    ref_model = torch.nn.Linear(128, 64)
    ref_model.load_state_dict(ours_model.state_dict())
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=0.0, weight_decay=0.01)
    ours = GaLoreAdamW8bit(ours_model.parameters(), **kw)
    ref = bnb.optim.AdamW8bit(ref_model.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(8):
        # Fixed gradients (not from the loss) so both moment sequences see identical inputs.
        scale = 10.0 ** torch.empty(1).uniform_(-3, 1, generator=g)
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            grad = torch.randn(p.shape, generator=g) * scale
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
        w_ours, w_ref = ours.state[ours_model.weight], ref.state[ref_model.weight]
        assert torch.equal(w_ours["exp_avg"], w_ref["state1"]), step
        assert torch.equal(w_ours["exp_avg_sq"], w_ref["state2"]), step
        assert torch.equal(w_ours["exp_avg_absmax"], w_ref["absmax1"]), step
        assert torch.equal(w_ours["exp_avg_sq_absmax"], w_ref["absmax2"]), step
        torch.testing.assert_close(ours_model.weight, ref_model.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours_model.bias, ref_model.bias, rtol=0, atol=1e-6)


def test_moment_overflow_is_refused_before_anything_changes():
    model = torch.nn.Linear(128, 64)
    opt = GaLoreAdamW8bit(model.parameters(), lr=1e-3)
    model(torch.randn(4, 128)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    weight = model.weight.detach().clone()
    model.weight.grad.fill_(1e30)  # finite, but (1 - beta2) * g^2 = 1e57 overflows fp32
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.step()
    assert torch.equal(model.weight, weight)
    for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
        assert torch.equal(opt.state[model.weight][k], before[k]), k


@pytest.mark.parametrize("policy,factory", [
    ("rotate", lambda g: DCTAdamW8bit(g, lr=1e-2, min_8bit_size=0, block_size=64)),
    ("rotate", lambda g: GaLoreAdamW8bit(g, lr=1e-2, min_8bit_size=0, projector="randomized", moments="rotate")),
    ("reset", lambda g: FrugalAdamW8bit(g, lr=1e-2, min_8bit_size=0, projector="columns")),
])
def test_refresh_policy_on_quantized_moments(policy, factory):
    """A refresh dequantizes, rotates (or zeroes), and requantizes: the stored result is exactly the
    quantization of the fp32 policy applied to the dequantized moments."""
    model = mlp()
    opt = factory(groups(model, gap=100))
    train(model, opt, steps=4)
    group = next(g for g in opt.param_groups if "rank" in g)
    p = model[0].weight
    state = opt.state[p]
    bs = group["block_size"]
    old = {k: dequantize_blockwise(state[k], state[k + "_absmax"], signed=k == "exp_avg", block_size=bs) for k in ("exp_avg", "exp_avg_sq")}
    projector = opt.projector(group)
    grad_t, transposed = (p.grad.T, True) if p.shape[0] < p.shape[1] else (p.grad, False)
    n = grad_t.shape[1]
    old_basis = projector.basis(state, n, p.device)
    frame = WholeMatrix(p.shape).oriented(transposed)
    moments = frame.moments(opt.rule.rank_for(group, torch.Size(frame.shape)))
    opt.rule.refresh(projector, group, state, torch.randn(grad_t.shape), transposed, frame, moments)
    if policy == "reset":
        assert int(state["step"]) == 0
        for k in ("exp_avg", "exp_avg_sq"):
            assert state[k].dtype == torch.uint8
            assert (dequantize_blockwise(state[k], state[k + "_absmax"], signed=k == "exp_avg", block_size=bs) == 0).all()
        return
    overlap = old_basis @ projector.basis(state, n, p.device).T
    expected = {"exp_avg": old["exp_avg"] @ overlap, "exp_avg_sq": old["exp_avg_sq"] @ overlap.square()}
    for k, v in expected.items():
        codes, absmax = quantize_blockwise(v, signed=k == "exp_avg", block_size=bs)
        assert torch.equal(state[k], codes) and torch.equal(state[k + "_absmax"], absmax), k


def test_bf16_checkpoint_keeps_codes_and_fp32_absmax():
    model = mlp(dtype=torch.bfloat16)
    opt = GaLoreAdamW8bit(groups(model), lr=1e-2, min_8bit_size=0, bf16_stochastic_round=True)
    train(model, opt, steps=4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = GaLoreAdamW8bit(groups(model), lr=1e-2, min_8bit_size=0, bf16_stochastic_round=True)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert fresh.state[p][k].dtype == v.dtype and torch.equal(fresh.state[p][k], v), k
    st = fresh.state[model[0].weight]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32
    assert st["sr_step"].device.type == "cpu"


def test_changed_block_size_is_refused():
    model = mlp()
    opt = GaLoreAdamW8bit(groups(model), lr=1e-2, min_8bit_size=0)
    train(model, opt, steps=2)
    for g in opt.param_groups:
        g["block_size"] = 64
    with pytest.raises(RuntimeError, match=r"block_size=64 needs"):
        train(model, opt, steps=1)


# ----------------------------------------------------------------------------------------------
# bf16 stochastic rounding


def test_stochastic_rounding_is_unbiased():
    x = torch.tensor([1.0 + 2**-10, -3.14159, 1e-3 + 1e-7, 123.456], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([bf16_stochastic_round(x, g).float() for _ in range(4000)])
    spacing = (x.abs() * 2**-7)  # bf16 keeps 8 significant bits: spacing <= |x| 2^-7
    # Each draw is one of two neighbours `spacing` apart: the mean's std is <= spacing / (2 sqrt(4000));
    # 5 sigma is spacing / 25.
    assert ((draws.mean(0) - x).abs() <= spacing / 25).all()
    lower, upper = draws.min(0).values, draws.max(0).values
    assert ((upper - lower) <= spacing).all()  # only the two bf16 neighbours ever come out
    assert torch.equal(bf16_stochastic_round(torch.tensor([0.5, -2.0])), torch.tensor([0.5, -2.0], dtype=torch.bfloat16))


def test_tiny_update_moves_bf16_weights_only_with_stochastic_rounding():
    # 1e-4 is far below bf16's spacing at 1 (2^-8 below, 2^-7 above): round-to-nearest loses it.
    def run(sr):
        p = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
        opt = GaLoreAdamW([p], lr=1e-4, bf16_stochastic_round=sr)
        p.grad = torch.ones_like(p)
        opt.step()  # Adam's first step moves every element by exactly lr
        return p.detach().float()

    assert torch.equal(run(False), torch.ones(20_000))
    moved = run(True)
    # Each element lands on 1 or 1 - 2^-8, the latter with probability 1e-4 / 2^-8 = 0.0256: the mean
    # is 1 - 1e-4 with std 2^-8 sqrt(0.0256 * 0.974 / 20000) = 4.4e-6; 5 sigma is 2.2e-5.
    assert abs(moved.mean().item() - (1 - 1e-4)) < 2.2e-5


def test_stochastic_rounding_leaves_global_rng_alone_and_is_reproducible():
    def run():
        model = mlp(dtype=torch.bfloat16)
        opt = GaLoreAdamW(groups(model), lr=1e-3, bf16_stochastic_round=True)
        rng = torch.get_rng_state()
        train(model, opt, steps=3)
        assert torch.equal(torch.get_rng_state(), rng)
        return [p.detach().clone() for p in model.parameters()]

    for p, q in zip(run(), run()):
        assert torch.equal(p, q)
