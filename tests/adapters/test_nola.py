"""NOLA: bases regenerated from seeds (blocked, never whole), float64 references for the combination and its
gradient, merge uses the learned coefficients, checkpoint = coefficients + seed, RNG hygiene."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from torch import nn

from slimtrain.adapters import NolaConfig
from slimtrain.adapters import _common
from slimtrain.adapters.nola import layer as nola_layer


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1 = nn.Linear(16, 48), nn.Linear(48, 8)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def wrap(**kw):
    kw = {"target_modules": ["lin0", "lin1"], "r": 4, "num_basis_A": 70, "num_basis_B": 33, **kw}
    return get_peft_model(MLP(), NolaConfig(**kw))


def bases64(seed, k, shape):
    """All k bases, built independently of the blocked path: one U(-1, 1) draw per 32-block, / sqrt(k)."""
    blocks = []
    for b in range(math.ceil(k / 32)):
        n = min(32, k - 32 * b)
        g = torch.Generator().manual_seed(_common.stable_seed(seed, b))
        blocks.append(torch.empty(n, *shape).uniform_(-1, 1, generator=g).double() / math.sqrt(k))
    return torch.cat(blocks)


def test_combine_bases_matches_float64_reference_and_gradient():
    k, shape, seed = 70, (5, 9), 1234
    coef = torch.randn(k, dtype=torch.float32, requires_grad=True)
    M = nola_layer.CombineBases.apply(coef, seed, shape)
    U = bases64(seed, k, shape)
    ref = torch.einsum("k,kij->ij", coef.detach().double(), U)
    torch.testing.assert_close(M.double(), ref, rtol=1e-6, atol=1e-7)  # fp32 sum of 70 terms
    G = torch.randn(shape)
    (grad,) = torch.autograd.grad(M, coef, G)
    torch.testing.assert_close(grad.double(), torch.einsum("kij,ij->k", U, G.double()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(nola_layer.combine_bases_reference(coef, seed, shape), ref)


def test_delta_weight_matches_float64_recomputation():
    pm = wrap(init_weights=False)
    layer = pm.base_model.model.lin0
    seed_A0, seed_A, seed_B = layer.seeds["default"]
    r, fin, fout = 4, 16, 48
    a0 = torch.empty(r, fin).uniform_(-1 / 4, 1 / 4, generator=torch.Generator().manual_seed(seed_A0)).double()
    A = a0 + torch.einsum("k,kij->ij", layer.nola_coef_A["default"].detach().double(), bases64(seed_A, 70, (r, fin)))
    B = torch.einsum("k,kij->ij", layer.nola_coef_B["default"].detach().double(), bases64(seed_B, 33, (fout, r)))
    ref = (8.0 / r) * B @ A
    torch.testing.assert_close(layer.delta_weight("default").double(), ref, rtol=1e-5, atol=1e-6)
    # forward agrees with W + dW in float64
    x = torch.randn(3, fin)
    W = layer.base_layer.weight.double() + ref
    y = torch.nn.functional.linear(x.double(), W, layer.base_layer.bias.double())
    torch.testing.assert_close(layer(x).double(), y, rtol=1e-5, atol=1e-5)


def test_merge_uses_learned_coefficients():
    """The official code merges lora_B.weight @ lora_A.weight = 0 @ A: a no-op. Ours must move W."""
    pm = wrap(init_weights=False)
    w_before = pm.base_model.model.lin0.base_layer.weight.detach().clone()
    delta = pm.base_model.model.lin0.delta_weight("default")
    assert delta.abs().max() > 1e-3
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged.lin0.weight.detach(), w_before + delta)


def test_trainable_count_is_rank_and_shape_free():
    for r in (1, 4, 8):
        pm = wrap(r=r)
        assert pm.get_nb_trainable_parameters()[0] == 2 * (70 + 33)


def test_bases_deterministic_across_fresh_models_and_rng_untouched():
    torch.manual_seed(42)
    state = torch.get_rng_state()
    a, b = wrap(init_weights=False), wrap(init_weights=False)
    torch.manual_seed(42)
    x = torch.randn(4, 16)
    state = torch.get_rng_state()
    ya = a(x)
    ya.sum().backward()
    assert torch.equal(torch.get_rng_state(), state), "forward/backward must not touch the global RNG"
    torch.testing.assert_close(a.base_model.model.lin0.delta_weight("default"),
                               b.base_model.model.lin0.delta_weight("default"), rtol=0, atol=0)
    # different modules / seeds -> different bases
    assert a.base_model.model.lin0.seeds["default"] != a.base_model.model.lin1.seeds["default"]
    c = wrap(init_weights=False, seed=1)
    assert c.base_model.model.lin0.seeds["default"] != a.base_model.model.lin0.seeds["default"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bases_identical_on_cpu_and_gpu():
    pm = wrap(init_weights=False)
    cpu = pm.base_model.model.lin0.delta_weight("default")
    gpu = pm.cuda().base_model.model.lin0.delta_weight("default").cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)  # same bases; only matmul order may differ


def test_bases_never_materialized_whole(monkeypatch):
    biggest = []
    original = nola_layer.basis_block

    def spy(seed, block, num_basis, shape):
        out = original(seed, block, num_basis, shape)
        biggest.append(out.shape[0])
        return out

    monkeypatch.setattr(nola_layer, "basis_block", spy)
    pm = wrap(num_basis_A=100, num_basis_B=100, init_weights=False)
    pm(torch.randn(2, 16)).sum().backward()
    assert biggest and max(biggest) <= nola_layer.BLOCK < 100


def test_checkpoint_is_coefficients_plus_seed(tmp_path):
    pm = wrap(init_weights=False, seed=9)
    pm.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {
        "base_model.model.lin0.nola_coef_A": (70,), "base_model.model.lin0.nola_coef_B": (33,),
        "base_model.model.lin1.nola_coef_A": (70,), "base_model.model.lin1.nola_coef_B": (33,),
    }
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["seed"] == 9 and cfg["generator_version"] == _common.GENERATOR_VERSION
    # a checkpoint from another generator version refuses to load instead of using different bases
    cfg["generator_version"] = 99
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Invalid generator_version: 99"):
        PeftModel.from_pretrained(MLP(), tmp_path)


def test_refuses_bnb_4bit_with_clear_error():
    bnb = pytest.importorskip("bitsandbytes")
    model = MLP()
    model.lin0 = bnb.nn.Linear4bit(16, 48)
    with pytest.raises(TypeError, match=r"nola does not support bitsandbytes 4-bit"):
        get_peft_model(model, NolaConfig(target_modules=["lin0"]))


def test_refuses_unsupported_layer_type():
    model = MLP()
    model.emb = nn.Embedding(4, 4)
    with pytest.raises(TypeError, match=r"nola cannot wrap Embedding"):
        get_peft_model(model, NolaConfig(target_modules=["emb"]))


def test_use_dora_option_matches_definition():
    """NOLA + DoRA: the effective weight's row norms equal the magnitude vector."""
    pm = wrap(init_weights=False, use_dora=True)
    layer = pm.base_model.model.lin0
    with torch.no_grad():
        layer.nola_magnitude["default"].mul_(1.5)
    x = torch.randn(5, 16)
    y = pm(x)
    merged = copy.deepcopy(pm).merge_and_unload()
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    norms = torch.linalg.vector_norm(merged.lin0.weight, dim=1)
    torch.testing.assert_close(norms, layer.nola_magnitude["default"].detach(), rtol=1e-5, atol=1e-6)


def test_cached_bases_give_identical_outputs_and_grads():
    x = torch.randn(4, 16)
    outs = []
    for cache in (False, True):
        pm = wrap(init_weights=False, cache_bases=cache)
        for _ in range(2):  # second pass reads the cache
            pm.zero_grad()
            y = pm(x)
            y.pow(2).sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in pm.parameters() if p.requires_grad]))
        layer = pm.base_model.model.lin0
        assert (layer.basis_cache["default"] is not None) == cache
        assert not any("cache" in k for k in pm.state_dict())
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=0, atol=0)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
