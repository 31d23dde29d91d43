"""The declared state (``optimizer.state_spec``) is what a step creates, and the parts built on the step-rule
interface (copies, capabilities, a rule of one's own) behave as documented."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch

from slimtrain.optimizers import OPTIMIZERS, FrugalAdamW, GaLoreAdamW, LayerwiseStepper, LowRankAdamW, SSTAdamW
from slimtrain.optimizers.lowrank import LowRankRule
from slimtrain.optimizers.registry import unregister_method
from slimtrain.optimizers.state import describe

from .helpers import CONFIGS, batches, groups, mlp, train


def _spec_rows(opt, p):
    return sorted((s.key, s.shape, s.dtype) for s in opt.state_spec(p))


def _real_rows(opt, p):
    return sorted((s.key, s.shape, s.dtype) for s in describe(opt.state[p]))


@pytest.mark.parametrize("name,factory", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_declared_state_is_the_state_a_step_creates(name, factory):
    dtype = torch.bfloat16 if "sr" in name else torch.float32  # the row that rounds stochastically
    model = mlp(dtype=dtype)
    opt = factory(groups(model))
    train(model, opt, 1)
    for p in model.parameters():
        assert _spec_rows(opt, p) == _real_rows(opt, p), (name, tuple(p.shape))
        assert {s.key for s in opt.state_spec(p) if s.host} <= {k for k, v in opt.state[p].items() if v.device.type == "cpu"}


def test_declared_state_needs_only_shapes():
    """The memory calculator asks for the spec of parameters on the meta device."""
    with torch.device("meta"):
        model = mlp()
    for name, factory in CONFIGS:
        opt = factory(groups(model))
        assert all(opt.state_spec(p) for p in model.parameters()), name


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))], ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["galore-random", "fira-svd", "frugal-block", "sst"])
def test_a_copied_optimizer_continues_exactly(name, copier):
    """torch pickles only defaults, state and param groups; before 2026-11-28 a copy lost its projectors,
    seed and non-finite policy and failed at its next step."""
    factory = dict(CONFIGS)[name]
    model = mlp()
    opt = factory(groups(model))
    train(model, opt, 3)
    twin_model, twin = copier((model, opt))
    train(model, opt, 6, start=3)
    train(twin_model, twin, 6, start=3)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_capabilities_decide_the_paths():
    model = mlp()
    block = FrugalAdamW(groups(model), mode="block", density=0.5)
    assert not block.rule.capabilities.layerwise and not block.rule.capabilities.shardable
    with pytest.raises(RuntimeError, match="cannot run layer-wise"):
        LayerwiseStepper(block)
    sst = SSTAdamW(groups(model))
    assert sst.rule.capabilities.layerwise and not sst.rule.capabilities.shardable
    with pytest.raises(RuntimeError, match="cannot step a matrix from a gathered gradient"):
        sst.matrix_update(model[0].weight, torch.zeros(40, 24), sst.param_groups[-1], {})


def _zero_entry_points(model, opt, steps):
    """What slimtrain.sharding.zero does, on whole tensors: the owner's matrix_update, then apply_update_."""
    states = {}
    for x, y in batches(steps):
        for p in model.parameters():
            p.grad = None
        ((model(x) - y) ** 2).mean().backward()
        with torch.no_grad():
            for g in opt.param_groups:
                for p in g["params"]:
                    st = states.setdefault(id(p), {})
                    if "rank" in g and p.dim() == 2:
                        opt.apply_update_(p.data, g, opt.matrix_update(p, p.grad.clone(), g, st))
                    else:
                        opt.step_dense_shard_(p.data, p.grad.clone(), g, st)


def _layerwise(model, opt, steps):
    stepper = LayerwiseStepper(opt)
    for x, y in batches(steps):
        ((model(x) - y) ** 2).mean().backward()
    stepper.remove()


def test_a_rule_of_ones_own_runs_on_every_path(docs_example):
    """A new rule (docs/optimizers.md's SignGaLoreRule) plugs into LowRankAdamW(rule=...) and steps in one
    process, layer-wise and through the ZeRO entry points with the same result: bit for bit on CPU, where the
    fused apply runs its torch reference, whose arithmetic the materialized update repeats."""
    results = []
    for run in (lambda m, o: train(m, o, 4), lambda m, o: _layerwise(m, o, 4), lambda m, o: _zero_entry_points(m, o, 4)):
        model = mlp()
        run(model, LowRankAdamW(groups(model), lr=1e-2, rule=docs_example["SignGaLoreRule"]()))
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for p, q in zip(results[0], other):
            assert torch.equal(p, q)
    plain = mlp()
    train(plain, GaLoreAdamW(groups(plain), lr=1e-2), 4)
    assert not torch.equal(plain[0].weight, results[0][0])


@pytest.fixture
def docs_example():
    """The code blocks of docs/optimizers.md "Adding a method", executed as written, in one namespace; the
    method they register is forgotten afterwards."""
    text = (Path(__file__).parents[2] / "docs" / "optimizers.md").read_text()
    section = text[text.index("## Adding a method"):text.index("\n## ", text.index("## Adding a method") + 1)]
    blocks = [block.split("\n```\n")[0] for block in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    namespace: dict = {"__name__": "docs_example"}
    try:
        for block in blocks:
            exec(compile(block, "docs/optimizers.md", "exec"), namespace)
        yield namespace
    finally:
        if "residual_sgd" in OPTIMIZERS:
            unregister_method("residual_sgd")


def test_the_documented_new_method_works_as_the_docs_say(docs_example):
    ns = docs_example
    Method, Rule = ns["ResidualSGDAdamW"], ns["ResidualSGDRule"]
    assert OPTIMIZERS["residual_sgd"] is Method and OPTIMIZERS["residual_sgd8bit"] is ns["ResidualSGDAdamW8bit"]
    model = mlp()
    opt = Method(groups(model), lr=1e-2, residual_lr=0.05)
    train(model, opt, 3)
    for p in model.parameters():  # its declared state is the state it keeps
        assert _spec_rows(opt, p) == _real_rows(opt, p)
    assert int(opt.state[model[0].weight]["residual_steps"]) == 3
    with pytest.raises(ValueError, match="Invalid residual_lr: -1"):
        Method(groups(mlp()), residual_lr=-1)
    with pytest.raises(TypeError, match="residual_lr"):
        GaLoreAdamW(groups(mlp()), residual_lr=0.1)  # another method's option, named with its owner
    # The residual moves the weight: with residual_lr=0 it is GaLore exactly, with > 0 it is not.
    for lr, same in ((0.0, True), (0.05, False)):
        a, b = mlp(), mlp()
        train(a, LowRankAdamW(groups(a), lr=1e-2, rule=Rule(), residual_lr=lr), 3)
        train(b, GaLoreAdamW(groups(b), lr=1e-2), 3)
        assert torch.equal(a[0].weight, b[0].weight) is same
    # Resume is exact, through the generic checkpoint machinery.
    model, twin = mlp(), mlp()
    opt = Method(groups(model), lr=1e-2, residual_lr=0.05)
    train(model, opt, 3)
    twin.load_state_dict(model.state_dict())
    resumed = Method(groups(twin), lr=1e-2, residual_lr=0.05)
    resumed.load_state_dict(opt.state_dict())
    train(model, opt, 4, start=3)
    train(twin, resumed, 4, start=3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    assert opt.state_dict()["slimtrain"]["method"] == "ResidualSGDAdamW"
    from slimtrain.memory import estimate_memory

    counted = mlp()
    opt = ns["ResidualSGDAdamW8bit"](groups(counted), lr=1e-2, min_8bit_size=0, block_size=64)
    train(counted, opt, 1)
    est = estimate_memory("mlp", "residual_sgd8bit", rank=4, model=counted, min_8bit_size=0, block_size=64,
                          weight_dtype="fp32", target_modules=["0", "2", "4"])
    assert est.total.state == opt.state_bytes()


def test_a_rule_must_be_a_step_rule():
    with pytest.raises(TypeError, match=r"Invalid rule: 'galore' \(expected a slimtrain.optimizers.rule.StepRule"):
        LowRankAdamW(groups(mlp()), rule="galore")


def test_a_rule_without_8bit_states_refuses_state_bits_8():
    from slimtrain.optimizers.rule import Capabilities

    class Fp32Only(LowRankRule):
        capabilities = Capabilities(eight_bit=False, reason="its moments are updated in place in fp32")

    LowRankAdamW(groups(mlp()), rule=Fp32Only())  # fp32: fine
    with pytest.raises(ValueError, match=r"Invalid state_bits: 8 \(LowRankAdamW keeps no 8-bit states: its moments"):
        LowRankAdamW(groups(mlp()), rule=Fp32Only(), state_bits=8)
