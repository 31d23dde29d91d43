"""A method is named once: one ``register_method`` entry reaches the optimizers, their checkpoints,
``slimtrain memory`` and ``slimtrain pretrain --optimizer``; the registry refuses an entry that would make two
methods one, and every built-in entry says what its classes do."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimtrain.memory import estimate_memory
from slimtrain.memory import main as memory_main
from slimtrain.optimizers import OPTIMIZERS, GaLoreAdamW, LowRankAdamW, low_rank_param_groups
from slimtrain.optimizers._validation import check_nonneg
from slimtrain.optimizers.eight_bit import EightBitStates
from slimtrain.optimizers.lowrank import LowRankRule
from slimtrain.optimizers.registry import get_method, method_of, methods, register_method, unregister_method
from slimtrain.recipes import optim, pretrain
from slimtrain.recipes.data import shakespeare_files

from .helpers import groups, mlp, train


class ToyRule(LowRankRule):
    """GaLore whose subspace step is the sign of Adam's, times the method's own option."""

    name = "toy"
    options = ("sign_scale",)

    def update(self, p, grad, group, state, ctx):
        step = super().update(p, grad, group, state, ctx)
        step.direction = step.direction.sign().mul_(group["sign_scale"])
        return step


class ToyAdamW(LowRankAdamW):
    rule_type = ToyRule

    def __init__(self, params, lr=1e-3, *args, sign_scale=1.0, **kwargs):
        check_nonneg("sign_scale", sign_scale)
        super().__init__(params, lr, *args, sign_scale=sign_scale, **kwargs)


class ToyAdamW8bit(EightBitStates, ToyAdamW):
    pass


@pytest.fixture
def toy():
    method = register_method("toy", ToyAdamW, ToyAdamW8bit, recipe=dict(lr=1e-2, update_proj_gap=200, scale=0.25))
    yield method
    unregister_method("toy")
    assert "toy" not in OPTIMIZERS and "toy" not in optim.RECIPE_NAMES


def test_a_registered_method_is_an_optimizer(toy):
    assert OPTIMIZERS["toy"] is ToyAdamW and OPTIMIZERS["toy8bit"] is ToyAdamW8bit
    assert list(OPTIMIZERS)[-2:] == ["apollo8bit", "toy8bit"]  # after the built-in ones, each group in order
    assert get_method("toy") is toy and method_of(ToyAdamW8bit) is toy
    with pytest.raises(TypeError, match=r"'sign_scale' is an option of ToyAdamW"):
        GaLoreAdamW(groups(mlp()), sign_scale=2.0)


def test_a_registered_method_checkpoints_as_itself(toy):
    model = mlp()
    opt = ToyAdamW(groups(model), lr=1e-2, sign_scale=0.5)
    train(model, opt, 3)
    sd = opt.state_dict()
    assert sd["slimtrain"]["method"] == "ToyAdamW"
    twin = mlp()
    twin.load_state_dict(model.state_dict())
    resumed = ToyAdamW(groups(twin), lr=1e-2, sign_scale=0.5)
    resumed.load_state_dict(sd)
    train(model, opt, 4, start=3)
    train(twin, resumed, 4, start=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    galore_model = mlp()
    galore = GaLoreAdamW(groups(galore_model), lr=1e-2)
    train(galore_model, galore, 1)
    with pytest.raises(RuntimeError, match=r"written by ToyAdamW into GaLoreAdamW"):
        GaLoreAdamW(groups(mlp()), lr=1e-2).load_state_dict(sd)
    with pytest.raises(RuntimeError, match=r"written by GaLoreAdamW into ToyAdamW"):
        ToyAdamW(groups(mlp()), lr=1e-2).load_state_dict(galore.state_dict())
    eight = ToyAdamW8bit(groups(mlp()), lr=1e-2, min_8bit_size=0)
    assert eight.state_dict()["slimtrain"]["method"] == "ToyAdamW"


def test_a_registered_method_is_in_slimtrain_memory(toy, tmp_path, capsys):
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    config.to_json_file(tmp_path / "config.json")
    est = memory_main([str(tmp_path / "config.json"), "--optimizer", "toy8bit", "--rank", "4", "--json",
                       "--min-8bit-size", "64"])
    assert json.loads(capsys.readouterr().out)["setting"].startswith("toy rank 4, 8-bit states")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    opt = ToyAdamW8bit(low_rank_param_groups(model, "all-linear", rank=4), min_8bit_size=64)
    x = torch.randint(0, 256, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    assert est.total.state == opt.state_bytes()  # the toy's own declaration, counted exactly
    assert estimate_memory(config, "toy", rank=4, model=model, sign_scale=2.0).total.state > 0
    with pytest.raises(ValueError, match=r"Invalid sign_scale: -1"):
        estimate_memory(config, "toy", rank=4, sign_scale=-1.0)


def test_a_registered_method_is_a_recipe(toy, tmp_path):
    assert "toy" in optim.RECIPE_NAMES and "toy8bit" in optim.OPTIMIZER_NAMES
    assert optim.DEFAULTS["toy"] == dict(lr=1e-2, update_proj_gap=200, scale=0.25)
    assert optim.capabilities("toy") == ToyRule.capabilities
    data = []
    for src in shakespeare_files()[:2]:
        (tmp_path / os.path.basename(src)).write_text(open(src).read()[:8_000])
        data.append(str(tmp_path / os.path.basename(src)))
    out = tmp_path / "run"
    pretrain.main(["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress",
                   "--data", *data, "--optimizer", "toy", "--rank", "8", "--steps", "2", "--eval-every", "2",
                   "--out", str(out)])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["optimizer"]["slimtrain"]["method"] == "ToyAdamW"
    assert ckpt["optimizer"]["param_groups"][-1]["sign_scale"] == 1.0
    assert json.loads((out / "summary.json").read_text())["optimizer_state_bytes"] > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="galore"), r"'galore' is registered already \(by GaLoreAdamW\)"),
    (dict(name="adamw"), r"Invalid method name: 'adamw'"),
    (dict(name="toy8bit"), r"not ending in '8bit'"),
    (dict(name="Toy-1"), r"Invalid method name: 'Toy-1' \(expected lowercase"),
    (dict(optimizer=GaLoreAdamW), r"GaLoreAdamW is method 'galore' already"),
    (dict(optimizer=torch.optim.AdamW), r"expected a LowRankAdamW subclass"),
    (dict(optimizer_8bit=LowRankAdamW), r"Invalid optimizer_8bit for method 'toy'.*expected a subclass of ToyAdamW"),
    (dict(recipe=dict(lr=1e-2)), r"Invalid recipe for method 'toy'.*expected lr, update_proj_gap, scale"),
    (dict(recipe=dict(lr=1e-2, update_proj_gap=200, scale=1.0, density=0.5)), r"Invalid recipe for method 'toy'"),
    (dict(modes={"a": LowRankRule}), r"ToyAdamW.rule_type \(ToyRule\) is not the rule of any mode"),
    (dict(modes={"a": ToyRule}, variants={"b": {"mode": "c"}}), r"Invalid mode: 'c' \(expected one of 'a'\)"),
    (dict(variants={"b": {"rnak": 1}}), r"Invalid variant 'b' of method 'toy': \['rnak'\] \(expected recipe keys"),
])
def test_the_registry_refuses_what_would_confuse_two_methods(kwargs, message):
    entry = dict(name="toy", optimizer=ToyAdamW, optimizer_8bit=None, recipe=dict(lr=1e-2, update_proj_gap=200, scale=1.0))
    with pytest.raises(ValueError, match=message):
        register_method(**{**entry, **kwargs})
    assert "toy" not in OPTIMIZERS


def test_the_same_definition_registers_again(toy):
    """A definition run again (a reloaded module, a notebook cell) replaces its entry; another class may not."""
    again = type("ToyAdamW", (ToyAdamW,), {"__module__": ToyAdamW.__module__, "__qualname__": ToyAdamW.__qualname__})
    assert register_method("toy", again, recipe=toy.recipe).optimizer is again
    assert OPTIMIZERS["toy"] is again and "toy8bit" not in OPTIMIZERS

    class Other(ToyAdamW):
        pass

    with pytest.raises(ValueError, match="'toy' is registered already"):
        register_method("toy", Other, recipe=toy.recipe)


@pytest.mark.parametrize("method", methods(), ids=lambda m: m.name)
def test_every_registered_method_says_what_its_classes_do(method):
    model = mlp()
    opt = method.optimizer(groups(model))
    assert isinstance(opt.rule, method.rule_type()) and method.mode_of(opt.rule) == method.default_mode
    for mode, rule in method.modes.items():
        assert isinstance(method.optimizer(groups(mlp()), mode=mode, density=0.5).rule, rule)
    assert method.optimizer_8bit is None or (
        issubclass(method.optimizer_8bit, method.optimizer) and method.optimizer_8bit(groups(mlp())).defaults["state_bits"] == 8)
    assert {k for rule in method.rule_types for k in rule.options} <= set(opt.defaults)
    for name in method.recipe_names:
        assert issubclass(optim.slimtrain_optimizer_class(name), method.optimizer)
