"""slimtrain RandLoRA: same math as peft's RandLora (checked on its own bases), full rank, bases never saved
and regenerated from the seed (Philox, unit variance; generator version 1 still reloads exactly), every
forward path agrees with every other, and with ``cache_bases=False`` B is never stored yet gives the same
outputs and gradients on both kernel backends."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import RandLoraConfig as PeftRandLoraConfig
from safetensors import safe_open
from torch import nn

from slimtrain.adapters import RandLoraConfig
from slimtrain._seeds import stable_seed
from slimtrain.adapters.randlora import RandLoraLayer, generated_basis, make_bases, randlora_delta, scaled_bases
from slimtrain.kernels import backends_used, use_backend

from slimtrain.kernels.philox import philox_uniform
from tests._device import DEVICE, needs_gpu, needs_triton  # tests/adapters is no package: import by root


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1, self.lin2 = nn.Linear(20, 48), nn.Linear(48, 36), nn.Linear(36, 12)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


TARGETS = ["lin0", "lin1", "lin2"]


def randomize(pm, prefix, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if prefix in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_delta_matches_peft_randlora_on_peft_bases():
    """Feed PEFT's own bases, lambda and gamma into our free function; PEFT pairs B's flattened column
    j*r+k with lambda[k', j'] where k'*n+j' = j*r+k, i.e. a fixed relabeling of i.i.d. columns. Undo it."""
    ref = get_peft_model(MLP(), PeftRandLoraConfig(target_modules=TARGETS, r=8, randlora_alpha=16))
    randomize(ref, "randlora_")
    for name in TARGETS:
        layer = getattr(ref.base_model.model, name)
        lam, gam = layer.randlora_lambda["default"], layer.randlora_gamma["default"]
        r, n = lam.shape
        d, D = min(layer.in_features, layer.out_features), max(layer.in_features, layer.out_features)
        A = layer.randlora_A["default"][:, 0, :d].float()  # PEFT: (r, 1, d_min) shared
        B_flat = layer.randlora_B["default"][:D, :n, :].float().reshape(D, n * r)
        B = B_flat.reshape(D, r, n).transpose(1, 2)  # ours: B[:, j, k] = PEFT's column k*n + j
        ours = randlora_delta(A.double(), B.double(), lam.double(), gam.double(), 16 / 8)
        if layer.in_features > layer.out_features:
            ours = ours.T
        torch.testing.assert_close(ours, layer.get_delta_weight("default").double(), rtol=1e-5, atol=1e-6)


def test_delta_matches_paper_sum_in_float64():
    r, n, d, D = 3, 4, 10, 14
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(r, d, generator=g, dtype=torch.float64), torch.randn(D, n, r, generator=g, dtype=torch.float64)
    lam, gam = torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    ref = sum(B[:, j, :] @ torch.diag(lam[:, j]) @ A @ torch.diag(gam[j]) for j in range(n))
    torch.testing.assert_close(randlora_delta(A, B, lam, gam, 1.0), ref)


def test_scaled_bases_backward_gradcheck():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 7, generator=g, dtype=torch.float64)
    lam = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gam = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, m: scaled_bases(A, l, m), (lam, gam))


def test_update_is_full_rank():
    pm = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, init_weights=False))
    randomize(pm, "slimrandlora_")
    for name in TARGETS:
        layer = getattr(pm.base_model.model, name)
        delta = layer.delta_weight("default").double()
        assert torch.linalg.matrix_rank(delta) == min(layer.in_features, layer.out_features)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_forward_paths_agree(dropout):
    """factored (PEFT's), dense (build dW once) and fused (x (W + dW)^T) give the same outputs and grads."""
    outs, grads = {}, {}
    x = torch.randn(6, 20)
    for mode in ("factored", "dense", "auto"):
        pm = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, randlora_alpha=8,
                                                  randlora_dropout=dropout, forward_mode=mode))
        randomize(pm, "slimrandlora_", std=0.1)
        pm.eval()
        y = pm(x)
        y.pow(2).sum().backward()
        outs[mode] = y.detach()
        grads[mode] = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    # fp32, summation order differs between paths: relative to each tensor's scale
    def close(a, b):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())

    for mode in ("dense", "auto"):
        close(outs[mode], outs["factored"])
        for n, g in grads[mode].items():
            close(g, grads["factored"][n])


def test_auto_mode_switches_on_token_count():
    """48 -> 36 layer, R = n*r = 40. Inference: factored T*40*84 vs fused 40*48*36 (T > 20.6) or unfused
    + T*48*36 (T > 42). Training: factored 2.5*T*40*84 vs fused 3*40*48*36 + T*48*36 (T > 31.3)."""
    pm = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8))
    layer = pm.base_model.model.lin1
    with torch.no_grad():
        assert not layer._use_dense("default", torch.zeros(30, 48), fused=False)
        assert layer._use_dense("default", torch.zeros(50, 48), fused=False)
        assert not layer._use_dense("default", torch.zeros(16, 48), fused=True)
        assert layer._use_dense("default", torch.zeros(2, 15, 48), fused=True)
    assert not layer._use_dense("default", torch.zeros(30, 48), fused=True)
    assert layer._use_dense("default", torch.zeros(33, 48), fused=True)


def test_bases_are_not_saved_and_regenerate(tmp_path):
    ours = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, seed=3))
    randomize(ours, "slimrandlora_")
    assert not any("slimrandlora_basis" in k for k in ours.state_dict())
    x = torch.randn(3, 20)
    y = ours(x)
    ours.save_pretrained(tmp_path / "ours")
    peft_rl = get_peft_model(MLP(), PeftRandLoraConfig(target_modules=TARGETS, r=8))
    peft_rl.save_pretrained(tmp_path / "peft")

    def numel(path):
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            return {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}

    saved = numel(tmp_path / "ours")
    assert all(("lambda" in k) or ("gamma" in k) for k in saved)
    assert sum(saved.values()) == ours.get_nb_trainable_parameters()[0]
    peft_saved = numel(tmp_path / "peft")
    assert sum(v for k, v in peft_saved.items() if "randlora_A" in k or "randlora_B" in k) > 0  # PEFT 0.21.2
    assert sum(peft_saved.values()) > 2 * sum(saved.values())
    reloaded = PeftModel.from_pretrained(MLP(), tmp_path / "ours")
    torch.testing.assert_close(reloaded(x), y, rtol=0, atol=0)


def test_global_rng_untouched_and_bases_deterministic():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, init_weights=False))
    torch.set_rng_state(state)
    b = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, init_weights=False))
    for part in ("A", "B"):
        assert torch.equal(getattr(a.base_model, f"slimrandlora_basis_{part}")["default"],
                           getattr(b.base_model, f"slimrandlora_basis_{part}")["default"])
    state = torch.get_rng_state()
    a(torch.ones(2, 20)).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_refuses_bnb_4bit():
    bnb = pytest.importorskip("bitsandbytes")
    model = MLP()
    model.lin0 = bnb.nn.Linear4bit(20, 48)
    with pytest.raises(TypeError, match="slimrandlora does not support bitsandbytes 4-bit"):
        get_peft_model(model, RandLoraConfig(target_modules=["lin0"]))


def test_fused_path_runs_one_matmul(monkeypatch):
    """In the fused case the base layer itself is not called: base and adapter share one F.linear."""
    pm = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, forward_mode="dense"))
    calls = []
    layer = pm.base_model.model.lin1
    monkeypatch.setattr(layer.base_layer, "forward", lambda *a, **k: calls.append(1) or torch.zeros(1))
    layer(torch.randn(4, 48))
    assert calls == []


def test_shared_bases_are_philox_with_unit_variance():
    pm = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, seed=3))
    bases = {part: getattr(pm.base_model, f"slimrandlora_basis_{part}")["default"] for part in ("A", "B")}
    # sized over all targets: d_max = 36 (lin1), D_max = 48 (lin0, lin1), n_max = ceil(36 / 8) = 5
    bound = math.sqrt(3)
    for part, shape in (("A", (8, 36)), ("B", (48, 5, 8))):
        expected = philox_uniform(stable_seed("randlora", 2, 3, part), shape, -bound, bound)
        assert torch.equal(bases[part], expected)
    # U(-sqrt(3), sqrt(3)): mean 0, variance 1; the sample variance of n draws has std sqrt(0.8 / n)
    A, B = make_bases(0, 8, 512, 512, 64)
    for basis in (A, B):
        n = basis.numel()
        assert abs(basis.mean().item()) < 6 * math.sqrt(1 / n)
        assert abs(basis.var().item() - 1) < 6 * math.sqrt(0.8 / n)


def test_generator_version_1_keeps_its_bases_and_reloads(tmp_path):
    """Adapters saved before Philox: U(-1, 1) on a CPU generator divided by its empirical std."""
    A, B = make_bases(3, 8, 36, 48, 5, generator_version=1)
    for basis, part, shape in ((A, "A", (8, 36)), (B, "B", (48, 5, 8))):
        g = torch.Generator().manual_seed(stable_seed("randlora", 1, 3, part))
        legacy = torch.empty(shape).uniform_(-1, 1, generator=g)
        assert torch.equal(basis, legacy / legacy.std())
    pm = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, seed=3, generator_version=1))
    assert torch.equal(pm.base_model.slimrandlora_basis_A["default"], A)
    randomize(pm, "slimrandlora_")
    x = torch.randn(3, 20)
    y = pm(x)
    pm.save_pretrained(tmp_path)
    torch.testing.assert_close(PeftModel.from_pretrained(MLP(), tmp_path)(x), y, rtol=0, atol=0)


@needs_gpu
def test_bases_built_on_the_gpu_equal_the_cpu_ones():
    cpu = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8)).base_model
    gpu = get_peft_model(MLP().to(DEVICE), RandLoraConfig(target_modules=TARGETS, r=8)).base_model
    for name in ("slimrandlora_basis_A", "slimrandlora_basis_B"):
        assert getattr(gpu, name)["default"].is_cuda
        assert torch.equal(getattr(gpu, name)["default"].cpu(), getattr(cpu, name)["default"])


def test_generated_basis_is_the_stored_one():
    """cache_bases=False describes exactly the B that cache_bases=True stores (same stream, same view)."""
    _, B = make_bases(3, 8, 36, 48, 5)
    assert torch.equal(generated_basis(3, 8, 48, 5).materialize().view(48, 5, 8), B)


def train_outputs(cache_bases, mode, use_dora, backend, device="cpu"):
    pm = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, randlora_alpha=8, forward_mode=mode,
                                              use_dora=use_dora, cache_bases=cache_bases))
    randomize(pm, "slimrandlora_", std=0.1)
    pm.to(device)
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(7)).to(device)
    with use_backend(backend):
        y = pm(x)
        y.pow(2).sum().backward()
    return pm, y.detach().cpu(), {n: p.grad.cpu() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("use_dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("mode", ["factored", "dense"])
def test_generated_B_is_never_stored_and_trains_the_same(mode, use_dora, backend):
    """Both orientations (lin0: in < out; lin1, lin2: in > out), forward and backward: the same outputs and
    gradients as the stored basis up to summation order, through the basis-matmul ops, with no B buffer.
    The Triton run is on the GPU when there is one (interpreted on CPU otherwise)."""
    device = DEVICE.type if backend == "triton" else "cpu"
    _, y_ref, g_ref = train_outputs(True, mode, use_dora, "torch")
    generated, y, grads = train_outputs(False, mode, use_dora, backend, device)
    assert set(generated.base_model.slimrandlora_basis_A.keys()) == {"default"}
    assert not generated.base_model.slimrandlora_basis_B.keys()
    assert not any(t.numel() >= 48 * 5 * 8 for t in generated.buffers())  # nothing the size of B
    for op in ("philox_linear", "philox_matmul"):
        assert backends_used()[(op, device)] == backend

    def close(a, b):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())

    close(y, y_ref)
    assert grads.keys() == g_ref.keys()
    for n, g in grads.items():
        close(g, g_ref[n])


def test_generated_B_saves_and_reloads_exactly(tmp_path):
    pm = get_peft_model(MLP(), RandLoraConfig(target_modules=TARGETS, r=8, seed=4, cache_bases=False))
    randomize(pm, "slimrandlora_", std=0.1)
    x = torch.randn(3, 20)
    y = pm(x)
    pm.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(MLP(), tmp_path)
    assert reloaded.peft_config["default"].cache_bases is False
    assert "default" not in reloaded.base_model.slimrandlora_basis_B
    torch.testing.assert_close(reloaded(x), y, rtol=0, atol=0)
    merged = reloaded.merge_and_unload()
    assert (merged(x) - y).abs().max() <= 1e-5 * y.abs().max()  # merging rounds W + dW once per layer


def test_delete_adapter_frees_its_bases_and_never_activates_a_basis_key():
    """The bases were keyed "<adapter>_A"/"_B" in other_param_names, so PEFT took those keys for adapter
    names: deleting the last adapter left active_adapters == ['default_A'], deleting the active one made
    'other_A' active (KeyError on the next forward), and the bases were never freed."""
    x = torch.randn(3, 20)
    base = MLP()
    with torch.no_grad():
        y_base = base(x)
    pm = get_peft_model(base, RandLoraConfig(target_modules=TARGETS, r=8, init_weights=False))
    pm.add_adapter("other", RandLoraConfig(target_modules=TARGETS, r=8, seed=1, init_weights=False))
    y_default = pm(x)
    pm.delete_adapter("default")
    assert pm.active_adapters == ["other"]
    for module in pm.modules():
        if isinstance(module, RandLoraLayer):
            assert module.active_adapters == ["other"]
    assert set(pm.base_model.slimrandlora_basis_A.keys()) == {"other"}
    assert set(pm.base_model.slimrandlora_basis_B.keys()) == {"other"}
    y_other = pm(x)  # raised KeyError: 'other_A' was the "adapter" chosen
    assert not torch.allclose(y_other, y_default)
    pm.delete_adapter("other")
    assert pm.active_adapters == []
    assert not pm.base_model.slimrandlora_basis_A.keys() and not pm.base_model.slimrandlora_basis_B.keys()
    torch.testing.assert_close(pm.base_model(x), y_base, rtol=0, atol=0)
