"""torch.optim's contract, for every slimtrain optimizer class and its 8-bit twin, plain and projected.

PyTorch checks its own optimizers with ``test/test_optim.py`` over ``torch.testing._internal.common_optimizers``:
state dicts that load and save back unchanged, tensor learning rates, descent on a small least-squares problem,
hooks, copies, closures, ``zero_grad``, param groups added later, loading onto other dtypes, and the errors
its base class raises. These are the same checks, written for ours. Where slimtrain differs from torch on
purpose (docs/optimizers.md, "Where slimtrain differs from torch.optim"), the test checks our side of it.

The problem is torch's: ``loss = |W x + b|^2`` with ``W`` 10 x 5, ``b`` 10, ``x`` 5. Its weight gradient has rank
one, the case where FRUGAL's residual is rounding noise (test_frugal_residual.py).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from slimtrain.optimizers import OPTIMIZERS
from slimtrain.optimizers.eight_bit import EightBitStates

from .._device import DEVICE

#: (id, class, projected): every class and its 8-bit twin, with nothing projected (AdamW inside the optimizer)
#: and with the matrix projected (rank 2, so rank 1 for FRUGAL's density 0.25 of 5 columns; a refresh every 3
#: steps, so the runs below cross refreshes).
CASES = [(f"{name}-{'projected' if projected else 'plain'}", cls, projected)
         for name, cls in OPTIMIZERS.items() for projected in (False, True)]
IDS = [c[0] for c in CASES]


def build(cls, projected: bool, params, **kwargs):
    """``cls(params, ...)`` at lr 1e-2; the 8-bit twins keep every moment in 8 bits (these are far below
    bitsandbytes' 4096-element threshold)."""
    kwargs = {"lr": 1e-2, **kwargs}
    if projected:
        kwargs = {"rank": 2, "update_proj_gap": 3, **kwargs}
    if issubclass(cls, EightBitStates):
        kwargs = {"min_8bit_size": 0, **kwargs}
    return cls(params, **kwargs)


def problem(seed: int = 0, contiguous: bool = True, dtype=torch.float32):
    """``(W, b, x)`` of torch's least-squares problem; non-contiguous parameters are strided views, as torch's."""
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        w, b = torch.randn(10, 5, generator=g), torch.randn(10, generator=g)
    else:
        w, b = torch.randn(10, 5, 2, generator=g)[..., 0], torch.randn(10, 2, generator=g)[..., 0]
    x = torch.randn(5, generator=g)
    return nn.Parameter(w.to(dtype)), nn.Parameter(b.to(dtype)), x.to(dtype)


def closure_for(opt, w, b, x):
    def closure():
        opt.zero_grad()
        loss = (w.mv(x) + b).float().pow(2).sum()
        loss.backward()
        return loss
    return closure


def run(opt, w, b, x, steps: int) -> float:
    closure = closure_for(opt, w, b, x)
    for _ in range(steps):
        opt.step(closure)
    return closure().item()


def clones(*params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def assert_same(a, b, path="state_dict"):
    """Two state dicts (or any nesting of dicts, lists and tensors) are equal: same keys, same types, tensors
    bit for bit with the same dtype and device."""
    assert type(a) is type(b) or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))), (path, a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), path
        assert torch.equal(a, b), path
    else:
        assert a == b, (path, a, b)


case = pytest.mark.parametrize("cls, projected", [c[1:] for c in CASES], ids=IDS)


# ------------------------------------------------------------------------------------------------ descent
@case
@pytest.mark.parametrize("variant", ["contiguous", "noncontiguous", "maximize", "group-options", "scheduler"])
def test_descends_on_a_convex_problem(cls, projected, variant):
    """20 steps lower torch's least-squares loss (raise it, with ``maximize``), for three seeds; with the
    matrix and vector in groups of their own lr and weight decay; and with an LR scheduler (ReduceLROnPlateau,
    which reads the loss, on the projected rows; StepLR on the others)."""
    for seed in range(3 if variant == "contiguous" else 1):
        w, b, x = problem(seed, contiguous=variant != "noncontiguous")
        if variant == "group-options":
            extra = {"rank": 2, "update_proj_gap": 3} if projected else {}
            params = [{"params": [w], "weight_decay": 0.1, **extra}, {"params": [b], "lr": 3e-2, "weight_decay": 0.0}]
            opt = build(cls, False, params)
        else:
            opt = build(cls, projected, [w, b], maximize=variant == "maximize")
        closure = closure_for(opt, w, b, x)
        scheduler = None
        if variant == "scheduler":
            scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1) if projected
                         else torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5))
        first = closure().item()
        for _ in range(20):
            loss = opt.step(closure)
            if scheduler is not None:
                scheduler.step(loss.item()) if projected else scheduler.step()
        last = closure().item()
        assert (last > first) if variant == "maximize" else (last < first), (seed, first, last)


# ------------------------------------------------------------------------------------------------ state dicts
@case
def test_state_dict_round_trips_unchanged(cls, projected):
    """Loading a state dict leaves it as it was, and the loader's own state dict is the same, key for key and
    bit for bit (groups included: nothing is added to them); saving, loading and saving again gives the same;
    ``torch.load(..., weights_only=True)`` reads it; and the two optimizers then step identically."""
    w, b, x = problem()
    opt = build(cls, projected, [w, b])
    run(opt, w, b, x, steps=4)  # past the refresh at step 3
    saved = opt.state_dict()
    given = copy.deepcopy(saved)

    w2, b2 = clones(w, b)
    other = build(cls, projected, [w2, b2])
    other.load_state_dict(given)
    assert_same(given, saved)  # the loaded dict is not changed
    assert_same(other.state_dict(), saved)

    opt.load_state_dict(opt.state_dict())
    assert_same(opt.state_dict(), saved)

    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    assert_same(torch.load(buf, weights_only=True), saved)

    run(opt, w, b, x, steps=4)
    run(other, w2, b2, x, steps=4)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    assert_same(other.state_dict(), opt.state_dict())


@case
def test_state_dict_without_newer_group_keys_loads(cls, projected):
    """A state dict from before an option existed (its groups lack the key) loads, and the option takes its
    default: torch's ``test_can_load_older_state_dict``."""
    w, b, x = problem()
    opt = build(cls, projected, [w, b])
    run(opt, w, b, x, steps=2)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["maximize"], group["bf16_stochastic_round"]
    opt.load_state_dict(saved)
    assert all(g["maximize"] is False and g["bf16_stochastic_round"] is False for g in opt.param_groups)
    run(opt, w, b, x, steps=1)


@case
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_state_loads_onto_parameters_of_another_dtype_and_device(cls, projected, dtype):
    """State saved from fp32 CPU parameters loads onto ``dtype`` ones on the device under test (CUDA when there is
    one): every tensor keeps the dtype it was saved with (fp32 moments, uint8 codes, int64 counters) where torch
    would cast it to the parameter's, counters stay on the host and the rest follows the parameters, and training
    goes on downhill."""
    w, b, x = problem()
    opt = build(cls, projected, [w, b])
    run(opt, w, b, x, steps=4)
    saved = opt.state_dict()
    w2, b2 = (nn.Parameter(p.detach().to(DEVICE, dtype)) for p in (w, b))
    other = build(cls, projected, [w2, b2])
    other.load_state_dict(saved)
    for p, q in ((w, w2), (b, b2)):
        host = other.state_host_keys(q, other.param_groups[0])
        for k, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert other.state[q][k].dtype == v.dtype, k
                assert other.state[q][k].device == (torch.device("cpu") if k in host else q.device), k
    x2 = x.to(DEVICE, dtype)
    before = run(other, w2, b2, x2, steps=0)
    assert run(other, w2, b2, x2, steps=5) < before


# ------------------------------------------------------------------------------------------------ tensor lr
@case
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-d", "[1]", "[1,1]"])
def test_tensor_lr_steps_as_its_value(cls, projected, shape):
    """A 1-element tensor lr of any shape (torch accepts all three) steps exactly as the float it holds, with
    weight decay, as a constructor default and as a group's own."""
    lr = torch.tensor(1e-2).reshape(shape)
    runs = []
    for value in (float(lr), lr):
        w, b, x = problem()
        extra = {"rank": 2, "update_proj_gap": 3} if projected else {}
        opt = build(cls, False, [{"params": [w], **extra}, {"params": [b], "lr": value}], lr=value, weight_decay=0.1)
        run(opt, w, b, x, steps=4)
        runs.append((w, b))
    (w1, b1), (w2, b2) = runs
    assert torch.equal(w1, w2) and torch.equal(b1, b2)


@case
def test_tensor_lr_follows_a_scheduler_in_place(cls, projected):
    """torch's LR schedulers update a tensor lr in place (``fill_``); every step reads the current value. The
    schedule's arithmetic is fp32 on the tensor and fp64 on the float, so the two runs agree to fp32 rounding
    of lr (1 part in 1e7) carried through 6 steps of size 1e-2: 1e-6 is ample."""
    runs = []
    for value in (1e-2, torch.tensor(1e-2)):
        w, b, x = problem()
        opt = build(cls, projected, [w, b], lr=value)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        for _ in range(6):
            opt.step(closure_for(opt, w, b, x))
            scheduler.step()
        if isinstance(value, torch.Tensor):
            assert opt.param_groups[0]["lr"] is value  # the same tensor, updated in place
        runs.append((w, b))
    (w1, b1), (w2, b2) = runs
    torch.testing.assert_close(w2, w1, rtol=0, atol=1e-6)
    torch.testing.assert_close(b2, b1, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ hooks
@case
def test_step_hooks_run_around_the_step_in_torch_order(cls, projected):
    w, b, x = problem()
    opt = build(cls, projected, [w, b])
    seen = []

    def record(name):
        def hook(optimizer, args, kwargs):
            assert optimizer is opt
            seen.append((name, w.detach().clone()))
        return hook

    handles = [register_optimizer_step_pre_hook(record("global pre")),
               opt.register_step_pre_hook(record("pre")), opt.register_step_post_hook(record("post")),
               register_optimizer_step_post_hook(record("global post"))]
    try:
        before = w.detach().clone()
        opt.step(closure_for(opt, w, b, x))
    finally:
        for h in handles:
            h.remove()
    assert [name for name, _ in seen] == ["global pre", "pre", "post", "global post"]
    assert torch.equal(seen[1][1], before) and torch.equal(seen[2][1], w) and not torch.equal(w, before)


@case
def test_state_dict_hooks_see_the_whole_state_dict(cls, projected):
    """State-dict hooks run around all of it: a post-hook sees slimtrain's entry (and what it adds is kept); a
    load pre-hook's changes are what is checked and loaded; a load post-hook sees the state as loaded, each
    tensor in its saved dtype."""
    w, b, x = problem()
    opt = build(cls, projected, [w, b])
    run(opt, w, b, x, steps=4)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))

    def post(o, sd):
        calls.append(("post", "slimtrain" in sd))
        sd["note"] = "kept"
    opt.register_state_dict_post_hook(post)
    saved = opt.state_dict()
    assert calls == ["pre", ("post", True)] and saved["note"] == "kept"

    w2, b2 = clones(w, b)
    other = build(cls, projected, [w2, b2])

    def load_pre(o, sd):
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.5
        return sd
    loaded = {}

    def load_post(o):
        loaded.update({k: v.dtype for k, v in o.state[w2].items() if isinstance(v, torch.Tensor)})
    other.register_load_state_dict_pre_hook(load_pre)
    other.register_load_state_dict_post_hook(load_post)
    other.load_state_dict(saved)
    assert other.param_groups[0]["lr"] == 0.5 and saved["param_groups"][0]["lr"] == 1e-2
    assert loaded == {k: v.dtype for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------------ copies, closures
@case
def test_deepcopy_is_a_whole_independent_optimizer(cls, projected):
    """A deep copy (of the optimizer with the model, as ``copy.deepcopy`` of both together) has every public
    attribute of the original and steps exactly as it does, without touching the original's parameters."""
    w, b, x = problem()
    opt = build(cls, projected, [w, b])
    run(opt, w, b, x, steps=2)
    repr(opt)  # torch's test_optimizer_can_be_printed
    (w2, b2), copied = copy.deepcopy(((w, b), opt))
    assert {k for k in vars(opt) if not k.startswith("_")} == {k for k in vars(copied) if not k.startswith("_")}
    frozen = w.detach().clone()
    run(copied, w2, b2, x, steps=4)
    assert torch.equal(w, frozen)
    run(opt, w, b, x, steps=4)
    assert torch.equal(w, w2) and torch.equal(b, b2)


@case
def test_step_calls_the_closure_once_with_grad_enabled(cls, projected):
    w, b, x = problem()
    opt = build(cls, projected, [w, b])
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss
    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True] and isinstance(loss, torch.Tensor)
    assert opt.step() is None


@case
def test_zero_grad_forms(cls, projected):
    """``zero_grad()`` sets gradients to None, and a step then moves and changes nothing. After
    ``zero_grad(set_to_none=False)`` the gradients are zeros, and a first step from them (no weight decay) moves
    nothing either; for SST, which rebuilds each weight from its SVD factors, nothing but that rebuild's
    rounding (|W - U S V^T| <= about 10 u |W|: 5e-6 here, measured 1e-6)."""
    w, b, x = problem()
    opt = build(cls, projected, [w, b])
    run(opt, w, b, x, steps=2)
    opt.zero_grad()
    assert w.grad is None and b.grad is None
    weights, state = (w.detach().clone(), b.detach().clone()), copy.deepcopy(opt.state_dict())
    opt.step()
    assert torch.equal(w, weights[0]) and torch.equal(b, weights[1])
    assert_same(opt.state_dict(), state)

    w, b, x = problem()
    fresh = build(cls, projected, [w, b])
    closure_for(fresh, w, b, x)()
    fresh.zero_grad(set_to_none=False)
    assert torch.count_nonzero(w.grad) == 0
    weights = (w.detach().clone(), b.detach().clone())
    fresh.step()
    assert torch.equal(b, weights[1])
    if cls.__name__.startswith("SST") and projected:
        torch.testing.assert_close(w, weights[0], rtol=0, atol=5e-6)
    else:
        assert torch.equal(w, weights[0])


# ------------------------------------------------------------------------------------------------ param groups
@case
def test_param_group_added_later_trains_and_round_trips(cls, projected):
    """``add_param_group`` after some steps: the dict given is left as it was, the new group trains at its own
    lr, and the optimizer still saves and loads exactly."""
    w, b, x = problem()
    first = {"params": [w], **({"rank": 2, "update_proj_gap": 3} if projected else {})}
    opt = build(cls, False, [first])
    run(opt, w, b, x, steps=2)
    late = {"params": [b], "lr": 3e-2}
    opt.add_param_group(late)
    assert late == {"params": [b], "lr": 3e-2}
    before = b.detach().clone()
    loss = run(opt, w, b, x, steps=0)
    assert run(opt, w, b, x, steps=3) < loss and not torch.equal(b, before)
    w2, b2 = clones(w, b)
    other = build(cls, False, [{**first, "params": [w2]}])
    other.add_param_group({"params": [b2], "lr": 3e-2})
    other.load_state_dict(opt.state_dict())
    run(opt, w, b, x, steps=2)
    run(other, w2, b2, x, steps=2)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_one_set_of_groups_builds_one_optimizer_after_another():
    """README's first example builds ``groups`` once and then one method after another from them (run as written
    by tests/test_docs.py): building an optimizer leaves the caller's group dicts as they were (torch writes its
    defaults into them, and the next method would refuse the keys of the previous one's options)."""
    from slimtrain.optimizers import SVDProjector, low_rank_param_groups

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.mlp, self.norm = nn.Linear(16, 16), nn.Linear(16, 16), nn.LayerNorm(16)

    groups = low_rank_param_groups(Block(), ["self_attn", "mlp"], rank=4, update_proj_gap=200, scale=0.25)
    as_given = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in groups])
    for cls in OPTIMIZERS.values():
        cls(groups, lr=1e-2)
    OPTIMIZERS["galore8bit"](groups, lr=1e-2, projector=SVDProjector(basis_dtype="bf16"))
    OPTIMIZERS["galore"](groups, lr=1e-2, projector="randomized", moments="rotate", stagger=True)
    assert [{k: v for k, v in g.items() if k != "params"} for g in groups] == as_given


def test_frugal_block_mode_takes_a_group_added_mid_window():
    """Block mode with a projected group added in the middle of a window: the new matrix takes the state-free
    rule until the window ends, then joins the selection over all the matrices."""
    from slimtrain.optimizers import FrugalAdamW

    torch.manual_seed(0)
    mats = [nn.Parameter(torch.randn(6, 4)) for _ in range(3)]
    opt = FrugalAdamW([{"params": mats[:2], "rank": 1, "update_proj_gap": 4}], lr=1e-2, mode="block", density=0.5,
                      block_order="ascending")
    for step in range(8):
        if step == 2:
            opt.add_param_group({"params": [mats[2]], "rank": 1, "update_proj_gap": 4})
        for p in mats:
            p.grad = torch.randn_like(p)
        before = mats[2].detach().clone()
        opt.step()
        if step in (2, 3):  # the rest of window 0: inactive, a sign step
            torch.testing.assert_close(mats[2], before - 1e-2 * mats[2].grad.sign(), rtol=0, atol=1e-7)
            assert not bool(opt.state[mats[2]]["active"])
    chosen = opt.active_blocks(1)  # window 1 (steps 4-7): 2 of the 3, in ascending order from where window 0 ended
    assert len(chosen) == 2 and 2 in chosen
    for i, p in enumerate(mats):
        assert bool(opt.state[p]["active"]) == (i in chosen) == ("exp_avg" in opt.state[p])


# ------------------------------------------------------------------------------------------------ errors
def _leaf():
    return nn.Parameter(torch.randn(4, 3))


#: (id, params factory, kwargs, error type, message regex): what torch's base class refuses (its words) and
#: what torch's AdamW refuses or accepts that we refuse (ours), for every class.
ERRORS = [
    ("params-not-iterable", lambda: _leaf(), {}, TypeError, r"params argument given to the optimizer should be an iterable"),
    ("empty", lambda: [], {}, ValueError, r"optimizer got an empty parameter list"),
    ("non-leaf", lambda: [_leaf() * 2], {}, ValueError, r"can't optimize a non-leaf Tensor"),
    ("same-param-two-groups", lambda: (lambda p: [{"params": [p]}, {"params": [p]}])(_leaf()), {}, ValueError,
     r"some parameters appear in more than one parameter group"),
    ("names-partly", lambda: [("w", _leaf()), _leaf()], {}, ValueError, r"all optimizer params should be with/without names"),
    ("lr-two-elements", lambda: [_leaf()], {"lr": torch.tensor([1e-3, 1e-3])}, ValueError,
     r"Invalid lr: tensor of shape \(2,\) \(expected a scalar\)"),
    ("lr<0", lambda: [_leaf()], {"lr": -1e-3}, ValueError, r"Invalid lr: -0\.001 \(expected a finite number >= 0\)"),
    ("beta1=1", lambda: [_leaf()], {"betas": (1.0, 0.0)}, ValueError, r"Invalid beta1: 1\.0 \(expected 0 <= beta1 < 1\)"),
    ("beta2=1", lambda: [_leaf()], {"betas": (0.0, 1.0)}, ValueError, r"Invalid beta2: 1\.0 \(expected 0 <= beta2 < 1\)"),
    ("tensor-betas", lambda: [_leaf()], {"betas": (torch.tensor(0.9), torch.tensor(0.99))}, ValueError,
     r"Invalid betas: \(tensor\(0\.9000\), tensor\(0\.9900\)\) \(expected two numbers; tensor betas are not supported\)"),
    ("weight_decay<0", lambda: [_leaf()], {"weight_decay": -1}, ValueError, r"Invalid weight_decay: -1 \(expected a finite number >= 0\)"),
    ("foreach", lambda: [_leaf()], {"foreach": True}, ValueError, r"Invalid foreach: True \(expected None: slimtrain picks its kernels"),
    ("fused", lambda: [_leaf()], {"fused": True}, ValueError, r"Invalid fused: True \(expected None"),
    ("tensor-lr-foreach", lambda: [_leaf()], {"lr": torch.tensor(1e-3), "foreach": True}, ValueError, r"Invalid foreach: True"),
    ("differentiable", lambda: [_leaf()], {"differentiable": True}, ValueError,
     r"Invalid differentiable: True \(expected False: the step runs under torch\.no_grad\(\)\)"),
    ("capturable", lambda: [_leaf()], {"capturable": True}, ValueError, r"Invalid capturable: True \(expected False"),
    ("amsgrad", lambda: [_leaf()], {"amsgrad": True}, ValueError, r"Invalid amsgrad: True \(expected False"),
    ("complex", lambda: [nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))], {}, ValueError,
     r"Invalid parameter: complex dtype torch\.complex64 is not supported \(use real parameters\)"),
    ("unknown-keyword", lambda: [_leaf()], {"nesterov": True}, TypeError, r"got unexpected keyword argument 'nesterov'"),
    ("unknown-group-key", lambda: [{"params": [_leaf()], "momentum": 0.9}], {}, TypeError,
     r"got unexpected param group key 'momentum'"),
]


@pytest.mark.parametrize("cls", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
@pytest.mark.parametrize("params, kwargs, exc, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_is_refused_at_construction(cls, params, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(params(), **kwargs)


@pytest.mark.parametrize("cls", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_duplicate_parameter_in_a_group_warns_as_torch(cls):
    p = _leaf()
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        cls([p, p])


@pytest.mark.parametrize("cls", list(OPTIMIZERS.values()), ids=list(OPTIMIZERS))
def test_sparse_gradient_is_refused_at_the_step(cls):
    p = _leaf()
    opt = cls([p])
    p.grad = torch.randn(4, 3).to_sparse()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="Sparse gradients are not supported by slimtrain optimizers"):
            opt.step()
