"""A refused model-building call changes nothing.

Every refusal that building an adapter can hit (``get_peft_model``, ``add_adapter``, ``add_weighted_adapter``),
for every method, is run on a model where a partial change is possible (a target before the refused one would
already be wrapped or updated). Afterwards the model's module tree (the same module objects under the same
names), its state_dict (the same tensors, equal bit for bit), every parameter's ``requires_grad`` and its
``peft_config`` must be exactly what they were before the call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import slimtrain.adapters as adapters  # noqa: E402
from cases import MODELS, TinyMLP  # noqa: E402


def _state(root: nn.Module) -> dict:
    config = root.peft_config if isinstance(root, PeftModel) else vars(root).get("peft_config")
    return {
        "tree": [(name, id(m), type(m)) for name, m in root.named_modules(remove_duplicate=False)],
        "tensors": [(name, id(t), t.dtype, t.detach().clone()) for name, t in root.state_dict(keep_vars=True).items()],
        "buffers": [(name, id(t)) for name, t in root.named_buffers(remove_duplicate=False)],
        "requires_grad": [(name, p.requires_grad) for name, p in root.named_parameters(remove_duplicate=False)],
        "peft_config": None if config is None else {k: id(v) for k, v in config.items()},
    }


def _assert_unchanged(before: dict, after: dict) -> None:
    for key in ("tree", "buffers", "requires_grad", "peft_config"):
        assert after[key] == before[key], f"{key} changed"
    assert [t[:3] for t in after["tensors"]] == [t[:3] for t in before["tensors"]], "state_dict changed"
    for (name, _, _, value), (_, _, _, old) in zip(after["tensors"], before["tensors"]):
        torch.testing.assert_close(value, old, rtol=0, atol=0, equal_nan=True, msg=f"{name} changed")


# ------------------------------------------------------------------------------------------------ models
class LinearThen(nn.Module):
    """``lin0`` (supported everywhere) registered before ``second``, the layer a method refuses."""

    def __init__(self, second: nn.Module):
        super().__init__()
        self.lin0 = nn.Linear(16, 16)
        self.second = second


def _mlp():
    torch.manual_seed(0)
    return TinyMLP()


def _llama():
    return MODELS["llama"].build()


def _with_bad_lin2(value) -> nn.Module:
    model = _mlp()
    with torch.no_grad():
        if isinstance(value, torch.Tensor):
            model.lin2.weight = nn.Parameter(value, requires_grad=False)
        else:
            model.lin2.weight[0, 0] = value
    return model


def _bnb(kind: str) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(16, 16) if kind == "4bit" else bnb.nn.Linear8bitLt(16, 16, has_fp16_weights=False)
    return LinearThen(layer)


MLP = ["lin0", "lin1", "lin2"]
TWO = ["lin0", "second"]
CONFIGS = {  # a config per method over some of TWO, for the refusals every method shares
    "nola": lambda targets=TWO: adapters.NolaConfig(target_modules=targets, r=2),
    "randlora": lambda targets=TWO: adapters.RandLoraConfig(target_modules=targets, r=4),
    "dora": lambda targets=TWO: adapters.DoraConfig(target_modules=targets, r=2),
    "loldu": lambda targets=TWO: adapters.LoLDUConfig(target_modules=targets, r=2),
    "s2ft": lambda targets=TWO: adapters.S2FTConfig(num_heads_per_block=0, num_channels_per_block=2,
                                                    target_modules=targets,
                                                    module_roles={"lin0": "ffn_rows", "second": "ffn_rows"}),
}


def _fresh(build, config, error, match):
    """get_peft_model on a fresh model: the model itself must come back untouched."""
    return build, lambda model: get_peft_model(model, config()), error, match


def _second(first, second, error, match):
    """get_peft_model on a model another PeftModel already wraps: that PeftModel must come back untouched."""
    return (lambda: get_peft_model(LinearThen(nn.Linear(16, 16)), first()),
            lambda peft_model: get_peft_model(peft_model.base_model.model, second()), error, match)


def _on_peft_model(build, config, call, error, match, other=None):
    """A call on an existing PeftModel (with a second adapter ``other`` when given)."""
    def prepared():
        model = get_peft_model(build(), config())
        if other is not None:
            model.add_adapter("other", other())
        return model
    return prepared, call, error, match


def _weighted(model):
    model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")


ALREADY = r"already wrapped by another PEFT method \((slimtrain|peft)\..*\); \S+ cannot stack on it"
SCENARIOS = {
    # a target no method can wrap, after one it can
    **{f"{m}-conv2d": _fresh(lambda: LinearThen(nn.Conv2d(16, 16, 1)), c, TypeError, "cannot wrap Conv2d")
       for m, c in CONFIGS.items()},
    # the advice names what the method takes: LoLDU and S²FT refuse 8-bit bases too
    **{f"{m}-bnb-4bit": _fresh(lambda: _bnb("4bit"), c, TypeError,
                               "does not support bitsandbytes 4-bit .* Load the model "
                               + (r"in bf16 or fp16 instead\.$" if m in ("loldu", "s2ft") else
                                  r"in 8-bit \(load_in_8bit=True\) or in bf16 instead\.$"))
       for m, c in CONFIGS.items()},
    **{f"{m}-bnb-8bit": _fresh(lambda: _bnb("8bit"), c, TypeError, "does not support bitsandbytes 8-bit")
       for m, c in CONFIGS.items() if m in ("loldu", "s2ft")},
    # a target another method (of ours or PEFT's) wraps, after one it does not
    **{f"{m}-over-loldu": _second(lambda: adapters.LoLDUConfig(target_modules=["second"], r=2), c, TypeError, ALREADY)
       for m, c in CONFIGS.items() if m != "loldu"},
    "loldu-over-nola": _second(lambda: adapters.NolaConfig(target_modules=["second"], r=2), CONFIGS["loldu"],
                               TypeError, ALREADY),
    "s2ft-over-lora": _second(lambda: LoraConfig(target_modules=["second"], r=2), CONFIGS["s2ft"], TypeError, ALREADY),
    "nola-over-lora": _second(lambda: LoraConfig(target_modules=["second"], r=2), CONFIGS["nola"], TypeError, ALREADY),
    # per-layer checks of one method, on a later layer
    "dora-rank": _fresh(_mlp, lambda: adapters.DoraConfig(target_modules=MLP, r=10), ValueError, "Invalid r: 10"),
    "loldu-rank": _fresh(_mlp, lambda: adapters.LoLDUConfig(target_modules=MLP, r=10), ValueError, "Invalid r: 10"),
    "loldu-nan-weight": _fresh(lambda: _with_bad_lin2(float("nan")), lambda: adapters.LoLDUConfig(target_modules=MLP),
                               ValueError, "non-finite entries"),
    "loldu-int-weight": _fresh(lambda: _with_bad_lin2(torch.zeros(8, 24, dtype=torch.int32)),
                               lambda: adapters.LoLDUConfig(target_modules=MLP, r=2), TypeError,
                               "needs a floating-point base weight"),
    "s2ft-no-role": _fresh(_mlp, lambda: adapters.S2FTConfig(num_heads_per_block=0, num_channels_per_block=2,
                                                             target_modules=["lin0", "lin1"],
                                                             module_roles={"lin0": "ffn_rows"}),
                           ValueError, "no S²FT role"),
    "s2ft-ffn-widths": _fresh(_mlp, lambda: adapters.S2FTConfig(num_heads_per_block=0, num_channels_per_block=2,
                                                                target_modules=["lin0", "lin1"],
                                                                module_roles={"lin0": "ffn_rows", "lin1": "ffn_rows"}),
                              ValueError, "channel counts differ"),
    "s2ft-channels": _fresh(_llama, lambda: adapters.S2FTConfig(num_heads_per_block=1, num_channels_per_block=49),
                            ValueError, "Invalid num_channels_per_block: 49"),
    "s2ft-heads": _fresh(_llama, lambda: adapters.S2FTConfig(num_heads_per_block=3, num_channels_per_block=2),
                         ValueError, "Invalid num_heads_per_block: 3"),
    "s2ft-kv-heads": _fresh(_llama, lambda: adapters.S2FTConfig(num_key_value_heads=3), ValueError,
                            "Invalid num_key_value_heads: 3"),
    "s2ft-head-dim": _fresh(_llama, lambda: adapters.S2FTConfig(head_dim=4), ValueError,
                            "Invalid target module .*v_proj: out_features=16"),
    "s2ft-no-heads": _fresh(lambda: LinearThen(nn.Linear(16, 16)),
                            lambda: adapters.S2FTConfig(num_heads_per_block=1, num_channels_per_block=0,
                                                        target_modules=TWO,
                                                        module_roles={"lin0": "attn_rows", "second": "attn_cols"}),
                            ValueError, "Invalid num_attention_heads: None"),
    # add_adapter on an existing PeftModel: layers before the refused one already hold the new adapter
    "loldu-add-adapter": _on_peft_model(_mlp, lambda: adapters.LoLDUConfig(target_modules=MLP, r=4),
                                        lambda m: m.add_adapter("other", adapters.LoLDUConfig(target_modules=MLP, r=10)),
                                        ValueError, "Invalid r: 10"),
    "dora-add-adapter": _on_peft_model(_mlp, lambda: adapters.DoraConfig(target_modules=MLP, r=4),
                                       lambda m: m.add_adapter("other", adapters.DoraConfig(target_modules=MLP, r=10)),
                                       ValueError, "Invalid r: 10"),
    **{f"{m}-add-adapter-conv2d": _on_peft_model(lambda: LinearThen(nn.Conv2d(16, 16, 1)), lambda c=c: c(["lin0"]),
                                                 lambda model, c=c: model.add_adapter("other", c()),
                                                 TypeError, "cannot wrap Conv2d")
       for m, c in CONFIGS.items()},
    "s2ft-add-adapter": _on_peft_model(_llama, lambda: adapters.S2FTConfig(num_heads_per_block=1,
                                                                           num_channels_per_block=4),
                                       lambda m: m.add_adapter("other", adapters.S2FTConfig(num_heads_per_block=1,
                                                                                            num_channels_per_block=49)),
                                       ValueError, "Invalid num_channels_per_block: 49"),
    # add_weighted_adapter: the new adapter is built in every layer, then a layer refuses to combine
    "loldu-weighted-other-factors": _on_peft_model(_mlp, lambda: adapters.LoLDUConfig(target_modules=MLP, r=4),
                                                   _weighted, ValueError, "use other LDU factors",
                                                   other=lambda: adapters.LoLDUConfig(target_modules=MLP, r=3)),
    "s2ft-weighted-other-selection": _on_peft_model(
        _llama, lambda: adapters.S2FTConfig(num_heads_per_block=1, num_channels_per_block=4), _weighted, ValueError,
        "train other rows or columns",
        other=lambda: adapters.S2FTConfig(num_heads_per_block=1, num_channels_per_block=4, seed=5)),
    **{f"{m}-weighted-refused": _on_peft_model(_mlp, c, _weighted, RuntimeError, "cannot combine adapters by weight",
                                               other=c)
       for m, c in {"nola": lambda: adapters.NolaConfig(target_modules=MLP, r=2),
                    "randlora": lambda: adapters.RandLoraConfig(target_modules=MLP, r=4),
                    "dora": lambda: adapters.DoraConfig(target_modules=MLP, r=2)}.items()},
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_refused_call_changes_nothing(scenario):
    build, call, error, match = SCENARIOS[scenario]
    root = build()
    before = _state(root)
    with pytest.raises(error, match=match):
        call(root)
    _assert_unchanged(before, _state(root))


def test_documented_sequence_reloads_exactly_after_a_refused_second_method(tmp_path):
    """The sequence docs/adapters.md once showed: LoLDU on a base, then S²FT on the same base (refused). The LoLDU
    model must still save and reload to the same outputs."""
    spec = MODELS["llama"]
    base = spec.build()
    model = get_peft_model(base, adapters.LoLDUConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    with pytest.raises(TypeError, match=ALREADY):
        get_peft_model(base, adapters.S2FTConfig(num_heads_per_block=1, num_channels_per_block=4))
    with torch.no_grad():
        expected = spec.output(model(**spec.batch()))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(spec.build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(spec.output(reloaded(**spec.batch())), expected, rtol=0, atol=0)
