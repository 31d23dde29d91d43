"""Standalone DoRA against PEFT's LoraConfig(use_dora=True): same outputs, gradients and merged weights on
copied parameters; finite where PEFT gives NaN (all-zero weight rows); base output reused without dropout."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from slimtrain.adapters import DoraConfig, LoLDUConfig, NolaConfig, RandLoraConfig, S2FTConfig
from slimtrain.adapters.delta_layer import DeltaLayer

TARGETS = ["lin0", "lin1"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1 = nn.Linear(12, 40), nn.Linear(40, 10)

    def forward(self, x):
        return self.lin1(torch.tanh(self.lin0(x)))


def pair(dropout=0.0, base=None, init=False):
    """PEFT's DoRA and ours on identical copies of one model, with PEFT's (random) A, B, m copied into ours."""
    base = MLP() if base is None else base
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, use_dora=True,
                                                         lora_dropout=dropout, init_lora_weights=init))
    ours = get_peft_model(copy.deepcopy(base), DoraConfig(target_modules=TARGETS, r=4, dora_alpha=8,
                                                          dora_dropout=dropout))
    with torch.no_grad():
        for name in TARGETS:
            a, b = getattr(ref.base_model.model, name), getattr(ours.base_model.model, name)
            b.dora_A["default"].copy_(a.lora_A["default"].weight)
            b.dora_B["default"].copy_(a.lora_B["default"].weight)
            b.dora_magnitude["default"].copy_(a.lora_magnitude_vector["default"].weight)
    return ref, ours


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_peft_dora_forward_and_backward(dropout):
    ref, ours = pair(dropout)
    ref.train(), ours.train()
    x = torch.randn(7, 12)
    torch.manual_seed(11)
    y_ref = ref(x)
    torch.manual_seed(11)  # same dropout masks: one dropout call per layer, same order, in both
    y = ours(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y_ref.pow(2).sum().backward()
    y.pow(2).sum().backward()
    for name in TARGETS:
        a, b = getattr(ref.base_model.model, name), getattr(ours.base_model.model, name)
        torch.testing.assert_close(b.dora_A["default"].grad, a.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.dora_B["default"].grad, a.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.dora_magnitude["default"].grad, a.lora_magnitude_vector["default"].weight.grad,
                                   rtol=1e-4, atol=1e-6)


def test_merged_weights_match_peft():
    ref, ours = pair()
    m_ref, m = ref.merge_and_unload(), ours.merge_and_unload()
    for name in TARGETS:
        torch.testing.assert_close(getattr(m, name).weight, getattr(m_ref, name).weight, rtol=1e-5, atol=1e-6)


def test_zero_norm_rows_stay_finite_where_peft_gives_nan():
    base = MLP()
    with torch.no_grad():
        base.lin0.weight[[3, 17]] = 0.0  # like Llama-3.1-8B o_proj's all-zero rows (PEFT issue #2049)
    x = torch.randn(5, 12)
    y_base = base(x)
    ref, ours = pair(base=base, init=True)
    assert torch.isnan(ref(x)).any(), "PEFT 0.21 is expected to produce NaN here; if not, update the docs"
    torch.testing.assert_close(ours(x), y_base, rtol=0, atol=0)
    ours.train()
    ours(x).pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)
    merged = copy.deepcopy(ours)
    merged.merge_adapter()
    torch.testing.assert_close(merged(x), ours(x), rtol=1e-5, atol=1e-6)
    merged.unmerge_adapter()
    assert torch.isfinite(merged.base_model.model.lin0.base_layer.weight).all()


@pytest.mark.parametrize("dropout,training,reuses", [(0.0, True, True), (0.3, False, True), (0.3, True, False)])
def test_base_output_reused_when_dropout_is_off(monkeypatch, dropout, training, reuses):
    calls = []
    original = DeltaLayer._base_without_bias
    monkeypatch.setattr(DeltaLayer, "_base_without_bias", lambda self, r: calls.append(1) or original(self, r))
    _, ours = pair(dropout)
    ours.train(training)
    ours(torch.randn(3, 12))
    assert (len(calls) == 2) == reuses and (len(calls) == 0) != reuses


def test_rank_larger_than_layer_is_rejected():
    with pytest.raises(ValueError, match=r"Invalid r: 11 for 'lin1' \(expected 1 <= r <= 10"):
        get_peft_model(MLP(), DoraConfig(target_modules=["lin1"], r=11))


def test_refuses_bnb_4bit():
    bnb = pytest.importorskip("bitsandbytes")
    model = MLP()
    model.lin0 = bnb.nn.Linear4bit(12, 40)
    with pytest.raises(TypeError, match="dora does not support bitsandbytes 4-bit"):
        get_peft_model(model, DoraConfig(target_modules=["lin0"]))


# ------------------------------------------------------------------ every DoRA-style adapter (DeltaLayer)
DORA_STYLE = {
    "dora": lambda seed: DoraConfig(target_modules=TARGETS, r=4, dora_alpha=8, init_weights=False),
    "nola-dora": lambda seed: NolaConfig(target_modules=TARGETS, r=4, num_basis_A=8, num_basis_B=8, seed=seed,
                                         use_dora=True, init_weights=False),
    "randlora-dora": lambda seed: RandLoraConfig(target_modules=TARGETS, r=4, seed=seed, use_dora=True,
                                                 init_weights=False),
}


def _two_dora_adapters(method):
    """Two non-trivial adapters of one DoRA-style method on one model, magnitudes moved off ||W + dW||."""
    model = get_peft_model(MLP(), DORA_STYLE[method](1))
    model.add_adapter("other", DORA_STYLE[method](2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("method", sorted(DORA_STYLE))
def test_merging_several_active_dora_adapters_reproduces_the_forward(method):
    """Both active: the forward composes them in order, each g from ||W + dW|| of the unmerged W; merging
    took the second norm from the already-merged weight (gap 2.3 for DoRA, 256 for NOLA-DoRA)."""
    model = _two_dora_adapters(method)
    x = torch.randn(5, 12)
    for module in model.modules():
        if isinstance(module, DeltaLayer):
            module.set_adapter(["default", "other"])
    with torch.no_grad():
        y = model(x)
        model.merge_adapter()
        y_merged = model(x)
        model.unmerge_adapter()
        y_unmerged = model(x)
    # fp32: a few roundings of W + dW and of the row norms; |y| ~ 1
    torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_unmerged, y, rtol=1e-5, atol=1e-5)


def test_several_active_dora_adapters_merge_like_peft_lora_dora():
    """The reference: PEFT's LoRA+DoRA with two active adapters merges to its own forward (8e-6)."""
    ref = get_peft_model(MLP(), LoraConfig(target_modules=TARGETS, r=4, use_dora=True, init_lora_weights=False))
    ref.add_adapter("other", LoraConfig(target_modules=TARGETS, r=4, use_dora=True, init_lora_weights=False))
    ours = get_peft_model(MLP(), DoraConfig(target_modules=TARGETS, r=4, dora_alpha=8))
    ours.add_adapter("other", DoraConfig(target_modules=TARGETS, r=4, dora_alpha=8))
    with torch.no_grad():
        for adapter in ("default", "other"):
            for name in TARGETS:
                a, b = getattr(ref.base_model.model, name), getattr(ours.base_model.model, name)
                b.dora_A[adapter].copy_(a.lora_A[adapter].weight)
                b.dora_B[adapter].copy_(a.lora_B[adapter].weight)
                b.dora_magnitude[adapter].copy_(a.lora_magnitude_vector[adapter].weight * 1.1)
                a.lora_magnitude_vector[adapter].weight.mul_(1.1)
    x = torch.randn(5, 12)
    outs = []
    for model in (ref.eval(), ours.eval()):
        for module in model.modules():
            if hasattr(module, "set_adapter") and hasattr(module, "merged_adapters"):
                module.set_adapter(["default", "other"])
        with torch.no_grad():
            y = model(x)
            model.merge_adapter()
            outs.append((y, model(x)))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(DORA_STYLE))
def test_low_cpu_mem_usage_load(method, tmp_path):
    """from_pretrained(low_cpu_mem_usage=True) builds adapters on the meta device; the DoRA magnitude was
    computed from them ("Cannot copy out of meta tensor"). It is loaded from the checkpoint instead."""
    model = _two_dora_adapters(method)
    x = torch.randn(5, 12)
    with torch.no_grad():
        y = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(MLP(), tmp_path, low_cpu_mem_usage=True).eval()
    assert not any(p.is_meta for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(DORA_STYLE) + ["loldu", "s2ft"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_keeps_the_base_dtype(method, dtype, tmp_path):
    """PEFT's contract: autocast_adapter_dtype=False leaves trainable adapter tensors in the base dtype (was
    ignored: they stayed fp32); the default upcasts them to fp32. Holds through save and load too."""
    configs = dict(DORA_STYLE, loldu=lambda seed: LoLDUConfig(target_modules=TARGETS, r=4, train_scale=True),
                   s2ft=lambda seed: S2FTConfig(target_modules=TARGETS, num_heads_per_block=0,
                                                num_channels_per_block=4,
                                                module_roles={"lin0": "ffn_rows", "lin1": "ffn_cols"}))
    x = torch.randn(5, 12, dtype=dtype)
    for autocast, expected in ((True, torch.float32), (False, dtype)):
        model = get_peft_model(MLP().to(dtype), configs[method](1), autocast_adapter_dtype=autocast)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == expected for p in trainable), {p.dtype for p in trainable}
        y = model(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        model.save_pretrained(tmp_path / str(autocast))
        loaded = PeftModel.from_pretrained(MLP().to(dtype), tmp_path / str(autocast), autocast_adapter_dtype=autocast)
        assert all(p.dtype == expected for n, p in loaded.named_parameters() if "default" in n and "base_layer" not in n
                   and p.dtype.is_floating_point and n.split(".")[-2] in _trainable_names(loaded))


def _trainable_names(model):
    names = set()
    for module in model.modules():
        if isinstance(module, DeltaLayer):
            names.update(module.adapter_layer_names)
    return names
