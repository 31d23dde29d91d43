"""Registration into PEFT: the version pin, the PeftType extension, idempotence, and canaries that fail
loudly when the PEFT internals slimtrain.adapters.registry relies on move."""

from __future__ import annotations

import collections
import inspect
import pickle
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peft
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import slimtrain.adapters as adapters
from slimtrain.adapters import registry

OURS = {
    "NOLA": (adapters.NolaConfig, adapters.NolaModel, "nola_"),
    "SLIMRANDLORA": (adapters.RandLoraConfig, adapters.RandLoraModel, "slimrandlora_"),
    "DORA": (adapters.DoraConfig, adapters.DoraModel, "dora_"),
    "LOLDU": (adapters.LoLDUConfig, adapters.LoLDUModel, "loldu_"),
    "S2FT": (adapters.S2FTConfig, adapters.S2FTModel, "s2ft_"),
}
# one working config per method on a 2-layer MLP (lin0 16 -> 32, lin1 32 -> 8)
MLP_CONFIGS = {
    "NOLA": lambda: adapters.NolaConfig(target_modules=["lin0"], r=2, num_basis_A=4, num_basis_B=4),
    "SLIMRANDLORA": lambda: adapters.RandLoraConfig(target_modules=["lin0"], r=4),
    "DORA": lambda: adapters.DoraConfig(target_modules=["lin0"], r=2),
    "LOLDU": lambda: adapters.LoLDUConfig(target_modules=["lin0"], r=2),
    "S2FT": lambda: adapters.S2FTConfig(target_modules=["lin0", "lin1"], num_heads_per_block=0,
                                        num_channels_per_block=4,
                                        module_roles={"lin0": "ffn_rows", "lin1": "ffn_cols"}),
}


def _mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(collections.OrderedDict(
        lin0=torch.nn.Linear(16, 32), act=torch.nn.ReLU(), lin1=torch.nn.Linear(32, 8)))


def test_installed_peft_is_in_supported_range():
    registry.check_peft_version()  # would have raised at import time already
    assert registry.SUPPORTED_PEFT_SPEC == "peft>=0.18,<0.22"


@pytest.mark.parametrize("version", ["0.17.1", "0.22.0", "1.0.0", "0.15.0"])
def test_unsupported_peft_versions_raise(version):
    with pytest.raises(ImportError, match=r"supports peft>=0\.18,<0\.22, found peft==" + version.replace(".", r"\.")):
        registry.check_peft_version(version)


@pytest.mark.parametrize("version", ["0.18.0", "0.20.1", "0.21.2", "0.21.3.dev0"])
def test_supported_peft_versions_pass(version):
    registry.check_peft_version(version)


@pytest.mark.parametrize("value", sorted(OURS))
def test_methods_are_registered(value):
    config_cls, model_cls, prefix = OURS[value]
    member = PeftType(value)
    assert member is PeftType[value] is getattr(PeftType, value)
    assert member in list(PeftType) and member == value and isinstance(member, str)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == prefix == model_cls.prefix
    assert config_cls(target_modules=["x"]).peft_type == member
    assert MLP_CONFIGS[value]().peft_type is member  # a member, not a plain str: PEFT reads .value
    assert registry.is_registered(value.lower())


def test_register_method_is_idempotent():
    n_members = len(PeftType._member_names_)
    registry.register_method("nola", adapters.NolaConfig, adapters.NolaModel, prefix="nola_")
    assert len(PeftType._member_names_) == n_members


def test_register_method_rejects_conflicts():
    with pytest.raises(ValueError, match=r"Invalid method name: 'nola' is already registered"):
        registry.register_method("nola", adapters.DoraConfig, adapters.NolaModel, prefix="nola_")
    with pytest.raises(ValueError, match=r"Invalid prefix: 'x_'"):
        registry.register_method("brandnew", adapters.NolaConfig, adapters.NolaModel, prefix="x_")
    with pytest.raises(ValueError, match=r"Invalid method name: 'NoLa'"):
        registry.register_method("NoLa", adapters.NolaConfig, adapters.NolaModel, prefix="nola_")


def test_config_json_round_trip(tmp_path):
    cfg = adapters.NolaConfig(target_modules=["lin0"], seed=5)
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "NOLA" and raw["seed"] == 5
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is adapters.NolaConfig and loaded.seed == 5


@pytest.mark.parametrize("value", sorted(OURS))
def test_peft_type_is_a_member_for_peft_code_paths(value, tmp_path):
    """PEFT reads ``config.peft_type.value`` (mixed models, hotswap, gradient checkpointing, error messages):
    a plain str there raised AttributeError instead of PEFT's own error. Pickling and saving round trip."""
    import torch

    with pytest.raises(ValueError, match=f"The provided `peft_type` '{value}' is not compatible with the `PeftMixedModel`"):
        peft.get_peft_model(_mlp(), MLP_CONFIGS[value](), mixed=True)

    model = peft.get_peft_model(_mlp(), MLP_CONFIGS[value]())
    assert model.peft_config["default"].peft_type.value == value
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(3, 16)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(_mlp(), tmp_path)
    assert loaded.peft_config["default"].peft_type is PeftType(value)


@pytest.mark.parametrize("value", sorted(OURS))
def test_adapter_config_with_plain_string_peft_type_loads(value, tmp_path):
    """adapter_config.json files written before peft_type was a member hold the same plain string (json
    writes a str enum as its value), and load into the member."""
    cfg = MLP_CONFIGS[value]()
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == value
    raw["peft_type"] = str.__str__(value)
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is OURS[value][0] and loaded.peft_type is PeftType(value)


def test_registration_on_import_and_stable_seeds_in_a_fresh_process():
    """A new interpreter registers on import, and derives the same basis seeds although its str hashes are
    salted differently (PYTHONHASHSEED fixed there, random here): seeds come from hashlib, not hash()."""
    from slimtrain._seeds import stable_seed

    code = ("import slimtrain.adapters; from peft.utils.peft_types import PeftType; "
            "from slimtrain._seeds import stable_seed; "
            "print(PeftType('NOLA').value, stable_seed('nola', 0, 'lin0', 'A'))")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["NOLA", str(stable_seed("nola", 0, "lin0", "A"))]


# ---------------------------------------------------------------------------- canaries on PEFT internals
def test_canary_peft_type_enum_internals():
    for attr in ("_member_map_", "_value2member_map_", "_member_names_"):
        assert hasattr(PeftType, attr), f"PeftType lost {attr}: registry._add_peft_type_member must change"


def test_canary_register_peft_method_signature():
    from peft.utils.peft_types import register_peft_method

    params = inspect.signature(register_peft_method).parameters
    assert {"name", "config_cls", "model_cls", "prefix"} <= set(params), params


def test_canary_base_tuner_contract():
    api = registry.peft_api
    assert api.BaseTuner.__abstractmethods__ == frozenset({"_create_and_replace"})
    for hook in ("_pre_injection_hook", "_check_target_module_exists", "_prepare_adapter_config",
                 "_replace_module", "_get_adapter_state_dict", "merge_and_unload", "_cast_adapter_dtype",
                 "_remap_adapter_state_dict_for_load"):
        assert hasattr(api.BaseTuner, hook), hook
    for attr in ("adapter_layer_names", "other_param_names", "merged_adapters", "set_adapter",
                 "get_base_layer", "_disable_adapters", "active_adapters"):
        assert hasattr(api.BaseTunerLayer, attr), attr
    assert api.resolve_quantization_backend is not None  # bnb 8-bit support needs peft >= 0.20


def test_canary_peft_config_check_kwargs_sees_the_loaded_file():
    """NolaConfig refuses a file without seed through PeftConfigMixin.check_kwargs (called by from_pretrained
    with the loaded JSON); if PEFT stops calling it, that refusal silently disappears."""
    src = inspect.getsource(registry.peft_api.PeftConfig.from_pretrained.__func__)
    assert "cls.check_kwargs(" in src


def test_canary_unknown_name_still_needs_the_enum():
    """register_peft_method must still refuse names missing from PeftType; if PEFT relaxes this, the enum
    extension in registry.py becomes unnecessary (and should be removed)."""
    from peft.utils.peft_types import register_peft_method

    with pytest.raises(ValueError, match="Unknown PEFT type"):
        register_peft_method(name="definitely_not_a_method", config_cls=object, model_cls=object)


@pytest.mark.parametrize("value", ["NOLA", "SLIMRANDLORA", "S2FT"])
def test_largest_seed_is_usable_everywhere_it_goes(value):
    """2**63 - 1, the top of the accepted range, reaches Philox, torch.Generator (RandLoRA's test-only init,
    S²FT's selection) and stable_seed without overflow; 2**63 is refused at config time."""
    import dataclasses

    import torch

    from slimtrain._seeds import MAX_SEED

    cfg = dataclasses.replace(MLP_CONFIGS[value](), seed=MAX_SEED, init_weights=False)
    out = peft.get_peft_model(_mlp(), cfg)(torch.randn(2, 16))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"Invalid seed: 9223372036854775808 \(expected an integer in \[0, 9223372036854775807\]\)"):
        dataclasses.replace(MLP_CONFIGS[value](), seed=MAX_SEED + 1)
