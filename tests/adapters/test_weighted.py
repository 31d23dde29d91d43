"""``add_weighted_adapter``: the new adapter's update is the weighted sum of the adapters' updates, in every layer,
for the methods whose update is linear over shared factors (LoLDU, S²FT); the others refuse by name with the
reason; bad arguments are refused (nothing changes then: tests/adapters/test_refusals.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))

import slimtrain.adapters as adapters  # noqa: E402
from cases import MODELS, TinyMLP  # noqa: E402
from slimtrain.adapters.loldu.layer import loldu_delta_weight  # noqa: E402

WEIGHTS = [0.7, -0.3]
U = 2.0**-24  # fp32 unit roundoff


def _two_adapters(config):
    model = get_peft_model(MODELS["llama"].build(), config())
    model.add_adapter("other", config())
    with torch.no_grad():  # two different, non-trivial adapters
        for name, p in model.named_parameters():
            if ".default" in name or ".other" in name:
                g = torch.Generator().manual_seed(len(name) + (".other" in name))
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.add_weighted_adapter(["default", "other"], WEIGHTS, "mix")
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all("mix" in m.scaling for m in layers)
    return model, layers


def _reference(layer, adapters=("default", "other")) -> torch.Tensor:
    return sum(w * layer.delta_weight(a) for a, w in zip(adapters, WEIGHTS))


def test_s2ft_weighted_update_is_the_weighted_sum_bit_for_bit():
    _, layers = _two_adapters(lambda: adapters.S2FTConfig(num_heads_per_block=1, num_channels_per_block=4))
    for layer in layers:
        # the blocks are summed in the same order as the dense updates, and the scatter into ΔW is exact
        assert torch.equal(layer.delta_weight("mix"), _reference(layer))


def test_loldu_weighted_update_is_the_weighted_sum():
    model, layers = _two_adapters(
        lambda: adapters.LoLDUConfig(r=4, target_modules=["q_proj", "v_proj"], train_scale=True))
    for layer in layers:
        perm, L, U_r, s = layer.loldu_perm["mix"], layer.loldu_L["mix"], layer.loldu_U["mix"], layer.scaling["mix"]
        assert layer.loldu_scale["mix"].item() == 0.0
        exact = sum(w * layer.coefficients(a).double() for a, w in zip(("default", "other"), WEIGHTS))
        # the diagonal z = d0 + c/s is rounded once to fp32 (<= U |z|), s (z - d0) twice more (<= 2U |c|); both
        # dense updates round each of their r products and the sum (<= (r + 2) U of the magnitudes involved)
        coef_err = s * U * layer.loldu_diag["mix"].abs() + 2 * U * exact.abs().float()
        magnitudes = sum(abs(w) * layer.coefficients(a).abs() for a, w in zip(("default", "other"), WEIGHTS))
        bound = loldu_delta_weight(perm, L.abs(), coef_err + (L.shape[1] + 2) * U * magnitudes, U_r.abs())
        err = (layer.delta_weight("mix") - _reference(layer)).abs()
        assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    model.set_adapter("mix")  # the combined adapter runs like any other
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"mix"}


@pytest.mark.parametrize("config,reason", [
    (lambda: adapters.NolaConfig(target_modules=["lin0"], r=2), "NolaModel cannot combine adapters by weight: its "
                                                                 "update s \\* B\\(b\\) A\\(a\\)"),
    (lambda: adapters.RandLoraConfig(target_modules=["lin0"], r=4), "RandLoraModel cannot combine adapters by "
                                                                     "weight: .* multiplies lambda by gamma"),
    (lambda: adapters.DoraConfig(target_modules=["lin0"], r=2), "DoraModel cannot combine adapters by weight: .* "
                                                                 "not linear in the adapter"),
])
def test_methods_whose_update_is_not_linear_refuse_with_the_reason(config, reason):
    model = get_peft_model(TinyMLP(), config())
    model.add_adapter("other", config())
    with pytest.raises(RuntimeError, match=reason):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")


@pytest.mark.parametrize("args,error,match", [
    ((["default", "nope"], [1.0, 1.0], "mix"), ValueError, r"Invalid adapters: \['default', 'nope'\]"),
    (([], [], "mix"), ValueError, r"Invalid adapters: \[\]"),
    ((["default", "other"], [1.0], "mix"), ValueError, r"Invalid weights: \[1\.0\] \(expected 2 finite numbers"),
    ((["default", "other"], [1.0, float("nan")], "mix"), ValueError, r"Invalid weights: \[1\.0, nan\]"),
    ((["default", "other"], [1.0, 1.0], "other"), ValueError, r"Invalid adapter_name: 'other' \(an adapter of that"),
    ((["default", "other"], [1.0, 1.0], "mix", "svd"), ValueError, r"Invalid combination_type: 'svd'"),
])
def test_bad_arguments_are_refused(args, error, match):
    model = get_peft_model(TinyMLP(), adapters.LoLDUConfig(target_modules=["lin0"], r=2))
    model.add_adapter("other", adapters.LoLDUConfig(target_modules=["lin0"], r=2))
    with pytest.raises(error, match=match):
        model.add_weighted_adapter(*args)


def test_adapters_over_different_modules_are_refused():
    model = get_peft_model(TinyMLP(), adapters.LoLDUConfig(target_modules=["lin0"], r=2))
    model.add_adapter("other", adapters.LoLDUConfig(target_modules=["lin0", "lin1"], r=2))
    with pytest.raises(ValueError, match=r"Invalid adapters: \['other'\] adapt other modules than 'default'"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
