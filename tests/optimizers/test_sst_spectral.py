"""SST in the paper's form: SpectralLinear, to_spectral/merge_spectral and SpectralSSTAdamW.

Bounds: an SVD reconstructs W to a backward error of a small multiple of max(m, n) * eps * ||W||_2; a
length-d dot product in a dtype with unit roundoff u errs by at most d * u * sum_k |a_k b_k| (Higham,
Accuracy and Stability, 3.1). The tests use those, with the constants written out.
"""

import copy
import io

import pytest
import torch
from torch import nn

from slimtrain.optimizers import SpectralLinear, SpectralSSTAdamW, merge_spectral, to_spectral
from slimtrain.optimizers.spectral import _SpectralProduct, sample_spectrum

from .helpers import mlp, train

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def svd_bound(w: torch.Tensor, eps: float) -> float:
    """Reconstruction bound for U diag(S) V^T of an m x n matrix: 10 max(m, n) eps ||W||_2."""
    return 10 * max(w.shape) * eps * torch.linalg.matrix_norm(w.double(), ord=2).item()


def spectral_mlp(rank: int = 4, seed: int = 0, dtype=torch.float32, **kwargs) -> nn.Sequential:
    return to_spectral(mlp(seed, dtype), ["0", "2"], rank, **kwargs)


# Conversion and merge -----------------------------------------------------------------------------
def test_conversion_is_exact_in_float64():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40).double()
    layer = SpectralLinear.from_linear(linear, rank=5)
    w = linear.weight.detach()
    bound = svd_bound(w, EPS64)
    assert (layer.merged_weight() - w).abs().max().item() <= bound
    u, s, v = layer.factors()
    eye = torch.eye(24, dtype=torch.float64)
    assert (u.T @ u - eye).abs().max().item() <= 10 * 40 * EPS64
    assert (v.T @ v - eye).abs().max().item() <= 10 * 24 * EPS64
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    # |(W' - W) x| <= ||W' - W||_max ||x||_1, plus each evaluation's rounding: two chained length-24
    # dot products for the factors, one for W, each within 24 eps |terms|.
    rows = x.abs().reshape(-1, 24).T
    terms = ((u.abs() * s) @ v.abs().T @ rows + w.abs() @ rows).max().item()
    err = (layer(x) - linear(x)).abs().max().item()
    assert err <= bound * rows.sum(0).max().item() + 3 * 24 * EPS64 * terms


def test_merge_back_matches_the_factors_to_the_dot_product_bound():
    model = spectral_mlp()
    train(model, SpectralSSTAdamW(model, lr=1e-2, update_proj_gap=3), steps=5)
    layer = model[0]
    u, s, v = (t.double() for t in layer.factors())
    exact = (u * s) @ v.T
    # merged_weight() is one fp32 matmul over d = 24 terms: |err| <= d * eps32 * sum_k |u_ik| s_k |v_jk|.
    bound = layer.d * EPS32 * ((u.abs() * s) @ v.abs().T)
    assert ((layer.merged_weight().double() - exact).abs() <= bound).all()
    x = torch.randn(32, 24)
    before = model(x)
    merge_spectral(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())
    torch.testing.assert_close(model[0].weight.double(), exact, rtol=0, atol=bound.max().item())
    # Same function, two fp32 evaluation orders (factored vs merged), through three layers: 1e-5 of |y| ~ 1
    # is ~ 100 eps32, the depth and width of this net times the dot-product bound.
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_merge_back_in_float64_returns_the_original_linear():
    model = mlp(dtype=torch.float64)
    weights = [model[i].weight.detach().clone() for i in (0, 2)]
    merge_spectral(to_spectral(model, ["0", "2"], rank=3))
    for i, w in zip((0, 2), weights):
        assert (model[i].weight - w).abs().max().item() <= svd_bound(w, EPS64)


def test_to_spectral_on_a_llama_keeps_its_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16)
    model = LlamaForCausalLM(config).double()
    ids = torch.randint(0, 64, (2, 16))
    before = model(input_ids=ids).logits
    to_spectral(model, ["attn", "mlp"], rank=8)
    converted = [n for n, m in model.named_modules() if isinstance(m, SpectralLinear)]
    assert len(converted) == 2 * 7 and not any("lm_head" in n for n in converted)
    # Each matrix reconstructs to ~1e-14 relative; through 2 blocks the logits (|l| ~ 1) move by far less than 1e-10.
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-10)


# Gradients --------------------------------------------------------------------------------------------
def dense_reference(layer: SpectralLinear, x: torch.Tensor, target: torch.Tensor):
    """Autograd through W = U diag(S) V^T, W itself a node, in float64."""
    u, s, v = (t.clone().requires_grad_() for t in layer.factors())
    xr = x.detach().clone().requires_grad_()
    w = (u * s) @ v.T
    w.retain_grad()
    loss = ((xr @ w.T + layer.bias.detach()) * target).sum()
    loss.backward()
    return xr.grad, w.grad, u, s, v


@pytest.mark.parametrize("enhanced", [True, False])
def test_gradients_match_autograd_of_the_dense_product(enhanced):
    torch.manual_seed(0)
    layer = SpectralLinear.from_linear(nn.Linear(5, 7).double(), rank=3, enhanced_grad=enhanced)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 4, 7, dtype=torch.float64)
    (layer(x) * target).sum().backward()
    grad_x, grad_w, u, s, v = dense_reference(layer, x, target)
    a = layer.active_idx
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(layer.s.grad, s.grad)
    torch.testing.assert_close(layer.bias.grad, target.sum((0, 1)))
    if enhanced:  # the paper's G V_S and G^T U_S
        torch.testing.assert_close(layer.u_active.grad, grad_w @ v.detach()[:, a])
        torch.testing.assert_close(layer.v_active.grad, grad_w.T @ u.detach()[:, a])
    else:  # the chain rule's, which carry the factor sigma_i
        torch.testing.assert_close(layer.u_active.grad, u.grad[:, a])
        torch.testing.assert_close(layer.v_active.grad, v.grad[:, a])
    assert layer.u_frozen.grad is None and not layer.u_frozen.requires_grad


def test_chain_rule_gradients_pass_gradcheck():
    torch.manual_seed(0)
    layer = SpectralLinear.from_linear(nn.Linear(5, 6).double(), rank=2, enhanced_grad=False)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    s, ua, va = (t.detach().clone().requires_grad_() for t in (layer.s, layer.u_active, layer.v_active))
    args = (layer.u_frozen, layer.v_frozen, layer.active_idx, layer.frozen_idx, False)
    assert torch.autograd.gradcheck(lambda *t: _SpectralProduct.apply(*t, *args), (x, s, ua, va))


def test_backward_under_autocast_gives_gradients_in_the_parameters_dtypes():
    layer = SpectralLinear.from_linear(nn.Linear(16, 12), rank=4)
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    for t in (x, layer.s, layer.u_active, layer.v_active):
        assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


# State and schedule ------------------------------------------------------------------------------------
def test_state_only_for_sigma_and_the_sampled_vectors():
    rank = 4
    model = spectral_mlp(rank)
    opt = SpectralSSTAdamW(model, lr=1e-2)
    train(model, opt, steps=1)
    expected = 0
    for layer in (model[0], model[2]):
        m, n, d = layer.out_features, layer.in_features, layer.d
        # fp32 moments: 2 d for sigma, 2 r (m + n) for the vectors; int64 counters: step x3, iters.
        expected += 4 * (2 * d + 2 * rank * (m + n)) + 8 * 4
        assert opt.state[layer.u_active]["exp_avg"].shape == (m, rank)
        assert layer.u_frozen not in opt.state and layer.u_active.grad.shape == (m, rank)
    # Plain AdamW for the rest: both spectral biases and the whole last Linear (16 -> 8).
    plain = [model[0].bias, model[2].bias, model[4].weight, model[4].bias]
    expected += sum(4 * 2 * p.numel() + 8 for p in plain)
    assert opt.state_bytes() == expected
    assert len(opt.param_groups[0]["params"]) == len(plain)


def test_resample_moves_columns_and_keeps_the_weight():
    layer = SpectralLinear.from_linear(nn.Linear(12, 10), rank=3)
    w, idx = layer.merged_weight(), layer.active_idx.clone()
    draws = [idx.tolist()]
    for _ in range(4):
        layer.resample_()
        draws.append(layer.active_idx.tolist())
        assert torch.equal(layer.merged_weight(), w)  # the same columns in the same places
        assert sorted(layer.active_idx.tolist() + layer.frozen_idx.tolist()) == list(range(10))
    assert len({tuple(d) for d in draws}) > 1
    assert int(layer.sample_draws) == 5


def test_sampling_follows_sigma():
    gen = torch.Generator().manual_seed(0)
    s = torch.tensor([10.0, 0.0, 0.0, 5.0, 0.0])
    for _ in range(20):  # p proportional to sigma: the zero singular values are never drawn
        assert sample_spectrum(s, 2, 0.0, gen).tolist() == [0, 3]
    mixed = {tuple(sample_spectrum(s, 2, 1.0, gen).tolist()) for _ in range(50)}
    assert any(1 in pair or 2 in pair or 4 in pair for pair in mixed)


def test_schedule_resamples_every_gap_and_resvds_every_round():
    model = spectral_mlp(rank=4)
    layer = model[0]
    opt = SpectralSSTAdamW(model, lr=1e-2, update_proj_gap=2, iterations_per_round=2)
    train(model, opt, steps=2)  # end of iteration 1: resample, vector moments restart
    assert int(layer.sample_draws) == 2
    assert int(opt.state[layer.s]["step"]) == 2 and int(opt.state[layer.u_active]["step"]) == 0
    assert opt.state[layer.u_active]["exp_avg"].abs().sum() == 0
    u, _, _ = layer.factors()
    assert (u.T @ u - torch.eye(24)).abs().max() > 1e-4  # vectors drifted from orthogonality
    train(model, opt, steps=2, start=2)  # end of round 1: re-SVD, sigma's moments restart too
    assert int(layer.sample_draws) == 3
    assert int(opt.state[layer.s]["step"]) == 0 and int(opt.state[layer.s]["iters"]) == 4
    u, s, v = layer.factors()
    assert (u.T @ u - torch.eye(24)).abs().max() <= 10 * 40 * EPS32
    assert (s[:-1] >= s[1:]).all()


def test_resvd_keeps_the_weight():
    model = spectral_mlp(rank=4)
    train(model, SpectralSSTAdamW(model, lr=1e-2, update_proj_gap=100), steps=5)
    layer = model[0]
    w = layer.merged_weight()
    layer.resvd_()
    assert (layer.merged_weight() - w).abs().max().item() <= svd_bound(w, EPS32)


def test_full_rank_layer_has_no_frozen_columns():
    model = to_spectral(mlp(), ["4"], rank=8)  # 16 -> 8: d = 8
    assert model[4].u_frozen.shape == (8, 0)
    loss = train(model, SpectralSSTAdamW(model, lr=1e-2, update_proj_gap=2), steps=5)
    assert torch.isfinite(torch.tensor(loss))


def test_state_dict_round_trip_resumes_bit_for_bit():
    def make(seed):
        model = spectral_mlp(rank=4, seed=seed)
        return model, SpectralSSTAdamW(model, lr=1e-2, weight_decay=0.01, update_proj_gap=3, iterations_per_round=2)

    model, opt = make(0)
    train(model, opt, steps=4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, resumed_opt = make(seed=7)  # other weights and samples: everything must come from the file
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.state[resumed[0].s]["iters"].dtype == torch.int64
    # Steps 5..12 cross two resamples (6, 9 -> re-SVD at 6 and 12) and a re-SVD with its new draw.
    train(model, opt, steps=8, start=4)
    train(resumed, resumed_opt, steps=8, start=4)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), key


def test_loading_a_state_dict_leaves_it_as_saved():
    """torch.optim's contract: save, load, save again gives the same state dict (no key added to the groups)."""
    model = spectral_mlp(rank=4)
    opt = SpectralSSTAdamW(model, lr=1e-2)
    train(model, opt, steps=2)
    saved = opt.state_dict()
    opt.load_state_dict(copy.deepcopy(saved))
    again = opt.state_dict()
    assert again["param_groups"] == saved["param_groups"]


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_tensor_lr_steps_as_its_float(shape):
    """torch accepts a one-element tensor of any of these shapes as lr; the steps equal the float's bit for bit."""
    runs = []
    for lr in (1e-2, torch.full(shape, 1e-2)):
        model = spectral_mlp(rank=4)
        train(model, SpectralSSTAdamW(model, lr=lr, weight_decay=0.01, update_proj_gap=2), steps=4)
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        assert torch.equal(p, q)


def test_float64_factors_step_in_float64_like_float32():
    """fp64 factors keep fp64 moments (Adam's reference; the kernel holds fp32 state only). One step from the
    same weights and batch agrees with the fp32 run to fp32 rounding of the update (lr 1e-2, |Adam| <= ~1)."""
    runs = []
    for dtype in (torch.float32, torch.float64):
        model = to_spectral(mlp().to(dtype), ["0", "2"], rank=4)
        opt = SpectralSSTAdamW(model, lr=1e-2)
        x = torch.randn(16, 24, generator=torch.Generator().manual_seed(2)).to(dtype)
        model(x).pow(2).mean().backward()
        opt.step()
        assert opt.state[model[0].s]["exp_avg"].dtype == dtype
        # compared as merged weights: the two SVDs may pick singular vectors of opposite signs
        runs.append([p.detach().double() for p in merge_spectral(model).parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_training_reduces_the_loss():
    # Fitting one fixed batch: AdamW (lr 1e-2) takes the loss from 0.58 to 0.001 in 100 steps, this from
    # 0.58 to 0.069 (rank 4 of 8..24, all three matrices spectral); a quarter leaves margin for the BLAS.
    model = to_spectral(mlp(), ["0", "2", "4"], rank=4)
    opt = SpectralSSTAdamW(model, lr=1e-2, update_proj_gap=10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 24, generator=g)
    y = torch.sin(3 * x[:, :8])
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])


# Bad inputs -----------------------------------------------------------------------------------------------
BAD_INPUTS = [
    (lambda: to_spectral(mlp(), ["nope"], 4), ValueError, r"Invalid target_modules: \['nope'\]"),
    (lambda: to_spectral(mlp(), ["0", "4"], 9), ValueError, r"Invalid rank: 9 .*<= 8 for layer '4'"),
    (lambda: to_spectral(mlp(), ["0"], 0), ValueError, r"Invalid rank: 0"),
    (lambda: to_spectral(mlp(), ["0"], 2, seed=-1), ValueError, r"Invalid seed: -1"),
    (lambda: SpectralLinear(4, 3, rank=1, uniform_mix=1.5), ValueError, r"Invalid uniform_mix: 1.5"),
    (lambda: SpectralLinear(4, 3, rank=1, enhanced_grad=1), ValueError, r"Invalid enhanced_grad: 1"),
    (lambda: SpectralSSTAdamW(spectral_mlp(), update_proj_gap=0), ValueError, r"Invalid update_proj_gap: 0"),
    (lambda: SpectralSSTAdamW(spectral_mlp(), iterations_per_round=0), ValueError, r"Invalid iterations_per_round: 0"),
    (lambda: SpectralSSTAdamW(spectral_mlp(), lr=-1.0), ValueError, r"Invalid lr: -1.0"),
    (lambda: SpectralSSTAdamW(spectral_mlp(), betas=(0.9, 1.0)), ValueError, r"Invalid beta2: 1.0"),
    (lambda: SpectralSSTAdamW(mlp()), ValueError, r"Invalid model: it has no SpectralLinear"),
    (lambda: SpectralSSTAdamW(list(mlp().parameters())), ValueError, r"Invalid model: list"),
]


@pytest.mark.parametrize("make, error, message", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_parameter(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_failed_conversion_changes_nothing():
    model = mlp()
    with pytest.raises(ValueError, match="Invalid rank"):
        to_spectral(model, ["0", "4"], 9)  # fits layer 0, not layer 4
    assert type(model[0]) is nn.Linear
