"""SSTAdamW: factor gradients against autograd in float64, and the reparametrization invariant."""

import torch

from slimtrain.optimizers import SSTAdamW
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
