"""torch.distributed.checkpoint (DCP) and FSDP2's DTensors, in one process on a one-rank gloo group.

DCP's ``get_optimizer_state_dict``/``set_optimizer_state_dict`` keep only a state dict's ``state`` and
``param_groups`` (so slimtrain's entry travels in each saved param group), and create a fresh optimizer's state
with one step at lr 0 on zero gradients (which must move no weight). Checkpoints through DCP resume bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from .helpers import CONFIGS, groups, mlp, train

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

OPTIONS = {
    "sharded": StateDictOptions(),
    "full": StateDictOptions(full_state_dict=True),
    "full-cpu-offload": StateDictOptions(full_state_dict=True, cpu_offload=True),
}
#: FRUGAL's block mode keeps moments only for the matrices active in the current window, so the layout of its state
#: changes from window to window; it has a test of its own below.
LAYOUT_FIXED = [c for c in CONFIGS if c[0] != "frugal-block"]


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("dcp") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _uninterrupted(factory, steps: int = 12) -> nn.Module:
    model = mlp()
    train(model, factory(groups(model)), steps)
    return model


def _saved_at_step_7(factory):
    model = mlp()
    opt = factory(groups(model))
    train(model, opt, 7)  # gap 5: between refreshes, and the rest crosses the one at step 10
    return model, opt


def _fresh(factory, model: nn.Module):
    """A new model holding ``model``'s weights (from a different initialization) and a new optimizer."""
    new = mlp(seed=5)
    new.load_state_dict(model.state_dict())
    return new, factory(groups(new))


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("factory", [c[1] for c in LAYOUT_FIXED], ids=[c[0] for c in LAYOUT_FIXED])
def test_get_and_set_optimizer_state_dict_resume_exactly(factory, option):
    model, opt = _saved_at_step_7(factory)
    sd = get_optimizer_state_dict(model, opt, options=OPTIONS[option])
    new, new_opt = _fresh(factory, model)
    set_optimizer_state_dict(new, new_opt, sd, options=OPTIONS[option])
    assert new_opt.skipped_steps == opt.skipped_steps and new_opt.rule.extra_state() == opt.rule.extra_state()
    train(new, new_opt, 5, start=7)
    assert _same_params(new, _uninterrupted(factory))


@pytest.mark.parametrize("factory", [c[1] for c in LAYOUT_FIXED], ids=[c[0] for c in LAYOUT_FIXED])
def test_dcp_save_and_load_resume_exactly(factory, tmp_path):
    """The usual DCP resume: the state dict to load into comes from the fresh optimizer (DCP's initialising step
    creates its state), ``dcp.load`` fills it from the files, ``set_optimizer_state_dict`` loads it."""
    model, opt = _saved_at_step_7(factory)
    opt.skipped_steps = 3  # an optimizer-level counter, kept in slimtrain's entry
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    new, new_opt = _fresh(factory, model)
    target = {"optim": get_optimizer_state_dict(new, new_opt)}
    dcp.load(target, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(new, new_opt, target["optim"])
    assert new_opt.skipped_steps == 3
    train(new, new_opt, 5, start=7)
    assert _same_params(new, _uninterrupted(factory))


@pytest.mark.parametrize("factory", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_initialising_step_moves_no_weight(factory):
    """DCP creates a fresh optimizer's state with a step at lr 0 on zero gradients: the state is there after it,
    and every weight is bit for bit what it was (SSTAdamW, which rebuilds weights from their factors, included)."""
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = factory(groups(model))
    get_optimizer_state_dict(model, opt)
    assert len(opt.state) == len(before)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


PROJECTOR_KEYS = ("proj_basis", "proj_indices", "proj_seed")


@pytest.mark.parametrize("name", [n for n, _ in CONFIGS if "sst" not in n and "block" not in n])
def test_subspace_after_the_initialising_step_comes_from_the_first_real_gradient(name):
    """The zero gradient of DCP's initialising step spans nothing: every projected method chooses its subspace again
    at the next step, from the first real gradient, the one a fresh optimizer picks (not one drawn from zeros and
    kept for a whole window)."""
    factory = dict(CONFIGS)[name]
    subspaces = []
    for initialise in (False, True):
        model = mlp()
        opt = factory(groups(model))
        if initialise:
            get_optimizer_state_dict(model, opt)
        train(model, opt, 1)
        subspaces.append([opt.state[p][k] for p in model.parameters() if p.dim() == 2
                          for k in PROJECTOR_KEYS if k in opt.state[p]])
    assert subspaces[0] and len(subspaces[0]) == len(subspaces[1])
    assert all(torch.equal(a, b) for a, b in zip(*subspaces))


def test_frugal_block_mode_is_exact_or_refused(tmp_path):
    """Block mode's state layout depends on the window, and DCP lays out what it loads from a fresh optimizer's
    (window 0): the sharded in-memory path resumes exactly; full state dicts and ``dcp.load`` into a fresh
    optimizer raise (a key of window 0 is missing from the checkpoint's window 1). Never anything in between:
    moments silently dropped or stale."""
    factory = dict(CONFIGS)["frugal-block"]
    expected = _uninterrupted(factory)
    outcomes = {}
    for name in ("sharded", "full", "dcp-load"):
        model, opt = _saved_at_step_7(factory)
        new, new_opt = _fresh(factory, model)
        try:
            if name == "dcp-load":
                dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / name))
                target = {"optim": get_optimizer_state_dict(new, new_opt)}
                dcp.load(target, checkpoint_id=str(tmp_path / name))
                set_optimizer_state_dict(new, new_opt, target["optim"])
            else:
                options = OPTIONS[name]
                set_optimizer_state_dict(new, new_opt, get_optimizer_state_dict(model, opt, options=options),
                                         options=options)
        except BaseException:  # noqa: BLE001  (DCP's CheckpointException is a BaseException)
            outcomes[name] = "refused"
            continue
        train(new, new_opt, 5, start=7)
        assert _same_params(new, expected), name
        outcomes[name] = "exact"
    assert outcomes["sharded"] == "exact", outcomes


def test_flattened_state_dict_is_refused_with_its_reason():
    """``flatten_optimizer_state_dict=True`` rebuilds the param groups from a live optimizer's keys only, which
    drops slimtrain's entry: refused, naming the option, rather than resumed without the entry."""
    factory = dict(CONFIGS)["galore-svd"]
    model, opt = _saved_at_step_7(factory)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    sd = get_optimizer_state_dict(model, opt, options=options)
    new, new_opt = _fresh(factory, model)
    with pytest.raises(RuntimeError, match=r"'slimtrain' entry .* is gone.*flatten_optimizer_state_dict=False"):
        set_optimizer_state_dict(new, new_opt, sd, options=options)


def test_dtensors_swapped_in_after_construction_are_taken_before_the_first_step_and_refused_after():
    """What Accelerate does with FSDP2: the optimizer is built on the model's tensors, ``fully_shard`` then turns
    the parameters into DTensors, and the optimizer's param groups are pointed at those. Before its first step the
    optimizer takes them and steps as one built after ``fully_shard``; after it, its state belongs to the tensors
    it was built with, and the swap is refused by name (tests/sharding/test_fsdp.py does the same on 2 ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slimtrain.optimizers import GaLoreAdamW

    def swapped(step_first: bool):
        model = mlp()
        opt = GaLoreAdamW(groups(model), lr=1e-2)
        if step_first:
            model(torch.randn(4, 24)).sum().backward()
            opt.step()
        names = {id(p): n for n, p in model.named_parameters()}
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        sharded = dict(model.named_parameters())
        for group in opt.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        return model, opt

    def train_sharded(model, opt):
        for seed in range(3):
            opt.zero_grad()
            model(torch.randn(4, 24, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
            opt.step()
        return [p.to_local().clone() for p in model.parameters()]

    built_after = mlp()
    fully_shard(built_after, mesh=init_device_mesh("cpu", (1,)))
    expected = train_sharded(built_after, GaLoreAdamW(groups(built_after), lr=1e-2))
    assert all(torch.equal(a, b) for a, b in zip(train_sharded(*swapped(False)), expected))

    model, opt = swapped(True)
    model(torch.randn(4, 24)).sum().backward()
    with pytest.raises(RuntimeError, match=r"stepping a DTensor of shape \([\d, ]+\) placed \(Shard\(dim=0\),\) that was "
                                           r"swapped in after it was built .* it has stepped already.* Build the "
                                           r"optimizer after fully_shard"):
        opt.step()
