"""SSTAdamW: factor gradients against autograd in float64, and the reparametrization invariant."""

import torch

from slimtrain.optimizers import SSTAdamW
from slimtrain.optimizers.sst import SSTRule
from slimtrain.optimizers.functional import sst_factor_grads

from .helpers import groups, mlp, train


def test_factor_grads_match_autograd():
    torch.manual_seed(0)
    m, n, idx = 7, 5, torch.tensor([0, 3])
    u, _ = torch.linalg.qr(torch.randn(m, n, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    s = torch.rand(n, dtype=torch.float64, requires_grad=True)
    target = torch.randn(m, n, dtype=torch.float64)
    u_ = u.clone().requires_grad_()
    v_ = v.clone().requires_grad_()
    w = (u_ * s) @ v_.T
    w.retain_grad()
    loss = ((w - target) ** 2).sum()
    loss.backward()
    g_s, g_u, g_v = sst_factor_grads(w.grad, u, v, idx)
    torch.testing.assert_close(g_s, s.grad)
    # autograd's vector gradients carry the factor sigma_i; SST's "enhanced" ones drop it.
    torch.testing.assert_close(g_u * s.detach()[idx], u_.grad[:, idx])
    torch.testing.assert_close(g_v * s.detach()[idx], v_.grad[:, idx])


def test_weight_stays_equal_to_its_factors_and_rounds_resvd():
    model = mlp()
    opt = SSTAdamW(groups(model, rank=3, gap=4), lr=1e-2, iterations_per_round=2)
    train(model, opt, steps=20)
    for p in (model[0].weight, model[2].weight):
        st = opt.state[p]
        torch.testing.assert_close(p, (st["sst_u"] * st["sst_s"]) @ st["sst_v"].T)
        assert st["sst_idx"].unique().numel() == 3
        assert (st["sst_s"] >= 0).all()
        # Step 16 began a round with an SVD; 4 steps later only the 3 sampled columns moved.
        u = st["sst_u"].double()
        others = [i for i in range(u.shape[1]) if i not in st["sst_idx"].tolist()]
        gram = u[:, others].T @ u[:, others]
        torch.testing.assert_close(gram, torch.eye(len(others), dtype=torch.float64), rtol=0, atol=1e-5)
    assert int(opt.state[model[0].weight]["sst_draws"]) == 5


def test_sampling_favours_large_singular_values():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.diag(torch.tensor([100.0, 50.0, 1e-4, 1e-4, 1e-4, 1e-4])))
    opt = SSTAdamW([{"params": [w], "rank": 2, "update_proj_gap": 1}], lr=1e-3, iterations_per_round=1000)
    counts = torch.zeros(6)
    for _ in range(40):
        w.grad = torch.randn(6, 6) * 1e-3
        opt.step()
        counts[opt.state[w]["sst_idx"]] += 1
    assert counts[:2].sum() > 70  # p ~ sigma: the two dominant vectors are drawn nearly always


def _sst_step(model, opt, seed=7):
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(seed))
    opt.zero_grad()
    ((model(x) - torch.sin(3 * x[:, :8])) ** 2).mean().backward()
    opt.step()


# W = U diag(S) V^T rebuilt from the SVD of a 40x24 fp32 matrix: error <= d eps |S|_max ~ 24 * 1.2e-7 * 5.
REBUILD_ATOL = 2e-5


def test_weight_loaded_between_steps_is_kept():
    """model.load_state_dict(other) between steps: the next step starts from `other`, it does not bring
    the old weights back from the factors (lr 0: the step rebuilds the weight and nothing else)."""
    model = mlp()
    opt = SSTAdamW(groups(model), lr=1e-2)
    train(model, opt, steps=3)
    other = mlp(seed=5)
    model.load_state_dict(other.state_dict())
    for g in opt.param_groups:
        g["lr"] = 0.0
    _sst_step(model, opt)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=REBUILD_ATOL)


def test_zeroed_weight_stays_zero_and_trains_from_there():
    model = mlp()
    opt = SSTAdamW(groups(model), lr=1e-2)
    train(model, opt, steps=3)
    with torch.no_grad():
        model[2].weight.zero_()
    assert float(opt.state[model[2].weight]["sst_s"].max()) > 0.5  # the factors still hold the old weight
    _sst_step(model, opt)
    # One step from zero: every Sigma_k is re-decomposed to 0 and moves by at most lr (Adam's first
    # direction is +-1), so |W_ij| <= lr * sum_k |u_ik| |v_jk| <= lr * |u_i| |v_j|, and row norms of the
    # (unit-column, near-orthogonal) factors stay near 1: 2 lr is loose. The old weight's entries reach ~0.15.
    assert model[2].weight.abs().max() <= 2 * 1e-2
    assert model[2].weight.abs().max() > 0  # it did train


def test_checkpoint_round_trip_then_external_write_is_kept():
    """After a resume the optimizer has never seen the weight: it checks it once against the factors,
    so a weight written before the first step is kept, and an untouched one resumes bit for bit
    (test_state_dict.py)."""
    model = mlp()
    opt = SSTAdamW(groups(model), lr=1e-2)
    train(model, opt, steps=3)
    resumed = mlp(seed=9)  # weights that are not the checkpoint's
    opt2 = SSTAdamW(groups(resumed), lr=0.0)
    opt2.load_state_dict(opt.state_dict())
    for g in opt2.param_groups:
        g["lr"] = 0.0
    _sst_step(resumed, opt2)
    for p, q in zip(resumed.parameters(), mlp(seed=9).parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=REBUILD_ATOL)


def test_detection_reads_no_weight_in_steady_state(monkeypatch):
    """The check is the parameter's version counter (free); the weight is compared with the factors
    only when there is no record: the first step after a load or a copy."""
    model = mlp()
    opt = SSTAdamW(groups(model), lr=1e-2)
    compared = []
    original = SSTRule._matches_factors
    monkeypatch.setattr(SSTRule, "_matches_factors", staticmethod(lambda p, st: compared.append(p) or original(p, st)))
    train(model, opt, steps=6)
    assert compared == []
    opt.load_state_dict(opt.state_dict())
    train(model, opt, steps=2)
    assert len(compared) == 3  # each of the three matrices once, at the first step after the load


def _resumed_draws(perturb) -> list[int]:
    """Train SST 3 steps, save, load into a fresh model and optimizer, ``perturb`` each loaded matrix weight, take
    one step: how many samples each matrix has drawn (a new round after a weight written elsewhere draws anew)."""
    model = mlp()
    opt = SSTAdamW(groups(model), lr=1e-2, update_proj_gap=5)
    train(model, opt, steps=3)
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    resumed = mlp(seed=9)
    opt2 = SSTAdamW(groups(resumed), lr=1e-2, update_proj_gap=5)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    with torch.no_grad():
        for p in resumed.parameters():
            if "sst_u" in opt2.state[p]:
                perturb(p)
    train(resumed, opt2, steps=1, start=3)
    return [int(opt2.state[p]["sst_draws"]) for p in resumed.parameters() if "sst_u" in opt2.state[p]]


def test_a_resume_on_another_processor_continues_the_saved_round():
    """Another processor's matrix product rounds the last bits of the rebuilt weight differently: a weight a few
    units of roundoff from its factors' product here is the same weight, and the saved round goes on; a weight
    moved by more than a product's rounding (here 1e-4 relative, about 800 units of roundoff) starts a new one."""
    untouched = _resumed_draws(lambda p: None)
    assert _resumed_draws(lambda p: p.mul_(1 + 4 * torch.finfo(torch.float32).eps)) == untouched
    assert all(a == b + 1 for a, b in zip(_resumed_draws(lambda p: p.mul_(1 + 1e-4)), untouched))
