"""Standalone DoRA against PEFT's LoraConfig(use_dora=True): same outputs, gradients and merged weights on
copied parameters; finite where PEFT gives NaN (all-zero weight rows); base output reused without dropout."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from slimtrain.adapters import DoraConfig
from slimtrain.adapters._common import DeltaLayer

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
