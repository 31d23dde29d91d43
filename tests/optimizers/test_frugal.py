"""FrugalAdamW: the state-free rule, block selection and what state is held."""

import torch

from slimtrain.optimizers import FrugalAdamW

from .helpers import groups, mlp, train


def test_block_mode_holds_moments_only_for_active_blocks():
    model = mlp()
    opt = FrugalAdamW(groups(model, gap=3), lr=1e-2, mode="block", density=0.34, block_order="descending")
    projected = [model[0].weight, model[2].weight, model[4].weight]
    seen = []
    for _ in range(3):
        train(model, opt, steps=3)
        active = [i for i, p in enumerate(projected) if bool(opt.state[p]["active"])]
        assert len(active) == 1  # round(0.34 * 3)
        for i, p in enumerate(projected):
            assert ("exp_avg" in opt.state[p]) == (i in active)
        seen.append(active[0])
    assert seen == [2, 1, 0]  # descending, cycling


def test_inactive_block_takes_a_sign_step():
    model = mlp()
    opt = FrugalAdamW(groups(model, gap=100), lr=0.05, mode="block", density=0.0)
    w = model[2].weight
    before = w.detach().clone()
    train(model, opt, steps=1)
    expected = before - 0.05 * torch.sign(w.grad)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)


def test_subspace_step_is_adam_in_subspace_plus_sign_of_residual():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))
    g = torch.randn(6, 4)
    opt = FrugalAdamW(
        [{"params": [w], "rank": 2, "update_proj_gap": 10, "scale": 1.0}],
        lr=0.1, density=None, projector="columns", eps=1e-8,
    )
    w0 = w.detach().double().clone()
    w.grad = g.clone()
    opt.step()
    idx = opt.state[w]["proj_idx"]
    g64 = g.double()
    low = g64[:, idx]
    # First Adam step: m = 0.1 g, v = 0.001 g^2, step size lr*sqrt(0.001)/0.1.
    adam = (0.1 * low) / ((0.001 * low**2).sqrt() + 1e-8) * (0.1 * 0.001**0.5 / 0.1)
    update = torch.zeros_like(g64)
    update[:, idx] = adam
    residual = g64.clone()
    residual[:, idx] = 0
    update += 0.1 * residual.sign()
    torch.testing.assert_close(w.detach().double(), w0 - update, rtol=0, atol=1e-6)


def test_density_sets_the_rank():
    model = mlp()
    opt = FrugalAdamW(groups(model), lr=1e-2, density=0.5)
    train(model, opt, steps=1)
    # 40x24 is projected on its 24 columns, 16x40 (left) on its 16 rows.
    assert opt.state[model[0].weight]["exp_avg"].shape == (40, 12)
    assert opt.state[model[2].weight]["exp_avg"].shape == (40, 8)


def test_block_flag_loads_onto_the_host():
    """``active`` is read with bool() every step: on a GPU that would synchronize. Loaded onto parameters
    on another device (here "meta", standing in for map_location to a GPU) it stays on the CPU, with
    the other host counters, while the moments follow the parameters."""
    model = mlp()
    opt = FrugalAdamW(groups(model), lr=1e-2, mode="block", density=0.5)
    train(model, opt, steps=3)
    target = mlp().to("meta")
    loaded = FrugalAdamW(groups(target), lr=1e-2, mode="block", density=0.5)
    loaded.load_state_dict(opt.state_dict())
    flags = [st["active"] for st in loaded.state.values() if "active" in st]
    assert flags and all(f.device.type == "cpu" for f in flags)
    moments = [st["exp_avg"] for st in loaded.state.values() if "exp_avg" in st]
    assert moments and all(m.device.type == "meta" for m in moments)
