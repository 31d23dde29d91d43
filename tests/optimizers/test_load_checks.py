"""A state dict another method, mode, projector or torch optimizer wrote is refused at load_state_dict,
naming both sides, and the refusal changes nothing."""

import copy
from pathlib import Path

import pytest
import torch

from slimtrain.optimizers import DCTAdamW, FiraAdamW, FrugalAdamW, GaLoreAdamW, GaLoreAdamW8bit, SSTAdamW

from .helpers import groups, mlp, resume_checkpoint, train

WRITERS = {
    "GaLoreAdamW": lambda g: GaLoreAdamW(g, lr=1e-2),
    "FiraAdamW": lambda g: FiraAdamW(g, lr=1e-2),
    "FrugalAdamW(mode='subspace')": lambda g: FrugalAdamW(g, lr=1e-2),
    "FrugalAdamW(mode='block')": lambda g: FrugalAdamW(g, lr=1e-2, mode="block", density=0.5),
    "DCTAdamW": lambda g: DCTAdamW(g, lr=1e-2),
    "SSTAdamW": lambda g: SSTAdamW(g, lr=1e-2),
}
PAIRS = [(a, b) for a in WRITERS for b in WRITERS if a != b]


def _trained(factory, steps=3):
    model = mlp()
    opt = factory(groups(model))
    train(model, opt, steps=steps)
    return model, opt


def _assert_refused_unchanged(opt, state_dict, match):
    before = copy.deepcopy(opt.state_dict())
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(RuntimeError, match=match):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert after["slimtrain"] == before["slimtrain"]
    assert after["state"].keys() == before["state"].keys()
    for i, st in before["state"].items():
        assert after["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(after["state"][i][k], v), k


@pytest.mark.parametrize("writer,reader", PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_other_method_refused(writer, reader):
    _, source = _trained(WRITERS[writer])
    _, target = _trained(WRITERS[reader], steps=2)
    # FRUGAL's mode is named where the reader is a FrugalAdamW too (then it is what differs).
    written = writer if reader.startswith("Frugal") else writer.split("(")[0]
    escape = lambda s: s.replace("(", r"\(").replace(")", r"\)")  # noqa: E731
    _assert_refused_unchanged(
        target, source.state_dict(),
        rf"Cannot load a state dict written by {escape(written)} into {escape(reader)}: .* build {escape(written)} to resume it",
    )


def test_other_projector_refused():
    _, source = _trained(lambda g: GaLoreAdamW(g, lr=1e-2))
    _, target = _trained(lambda g: GaLoreAdamW(g, lr=1e-2, projector="random"), steps=2)
    _assert_refused_unchanged(
        target, source.state_dict(),
        r"param group 1 was written with projector 'svd', this optimizer's group 1 uses 'random' .* projector='svd'",
    )


def test_torch_adamw_state_dict_refused():
    """Same groups, so torch would load it and GaLore would run as plain AdamW without its 'rank'."""
    model = mlp()
    ref = torch.optim.AdamW(groups(model), lr=1e-2)
    train(model, ref, steps=2)
    _, target = _trained(lambda g: GaLoreAdamW(g, lr=1e-2), steps=2)
    _assert_refused_unchanged(
        target, ref.state_dict(),
        r"Cannot load this state dict into GaLoreAdamW: it was written by torch\.optim\.AdamW, not by a slimtrain optimizer",
    )
    fresh = GaLoreAdamW(groups(mlp()), lr=1e-2)  # before any step, too
    _assert_refused_unchanged(fresh, ref.state_dict(), r"written by torch\.optim\.AdamW")


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name,reader,match", [
    ("fira-svd", lambda g: GaLoreAdamW(g), r"written by FiraAdamW into GaLoreAdamW"),
    ("sst", lambda g: FiraAdamW(g), r"written by SSTAdamW into FiraAdamW"),
    ("galore-svd", lambda g: SSTAdamW(g), r"written by one of DCTAdamW, GaLoreAdamW, LowRankAdamW into SSTAdamW"),
    ("frugal-block", lambda g: FrugalAdamW(g), r"written by FrugalAdamW\(mode='block'\) into FrugalAdamW\(mode='subspace'\)"),
    ("galore-random", lambda g: GaLoreAdamW(g, projector="columns"), r"projector 'random', this optimizer's group 1 uses 'columns'"),
])
def test_earlier_checkpoint_of_other_method_refused(name, reader, match):
    """Checkpoints from before the method was recorded (commit e556968) are told apart by their keys."""
    ckpt = torch.load(DATA / f"{name}.pt", weights_only=True)["opt"]
    _assert_refused_unchanged(reader(groups(mlp())), ckpt, match)


def test_same_method_loads_and_records_it():
    _, source = _trained(lambda g: GaLoreAdamW(g, lr=1e-2))
    sd = source.state_dict()
    assert sd["slimtrain"]["method"] == "GaLoreAdamW"
    GaLoreAdamW(groups(mlp()), lr=1e-2).load_state_dict(sd)
    # An 8-bit twin is its method with state_bits=8, which the loaded groups carry.
    _, eight = _trained(lambda g: GaLoreAdamW8bit(g, lr=1e-2, min_8bit_size=0))
    assert eight.state_dict()["slimtrain"]["method"] == "GaLoreAdamW"
    target = GaLoreAdamW(groups(mlp()), lr=1e-2)
    target.load_state_dict(eight.state_dict())
    assert target.param_groups[1]["state_bits"] == 8


def test_a_users_subclass_is_its_method():
    """A subclass defined outside slimtrain (tests and users write them) writes and reads its method's state:
    it is neither a new method nor a name in another optimizer's refusal."""

    class RecordingFira(FiraAdamW):
        pass

    model = mlp()
    fira = RecordingFira(groups(model), lr=1e-2)
    train(model, fira, 1)
    assert fira.state_dict()["slimtrain"]["method"] == "FiraAdamW"
    FiraAdamW(groups(mlp()), lr=1e-2).load_state_dict(fira.state_dict())
    legacy = torch.load(DATA / "fira-svd.pt", weights_only=True)["opt"]  # no recorded method: told by its keys
    with pytest.raises(RuntimeError, match=r"written by FiraAdamW into GaLoreAdamW"):
        GaLoreAdamW(groups(mlp()), lr=1e-2).load_state_dict(legacy)


IDENTITY = DATA / "identity"


@pytest.mark.parametrize("name,other,match", [
    ("frugal-block", lambda g: FrugalAdamW(g), r"written by FrugalAdamW\(mode='block'\) into FrugalAdamW\(mode='subspace'\)"),
    ("sst", lambda g: GaLoreAdamW(g), r"written by SSTAdamW into GaLoreAdamW"),
    ("galore8bit-svd-sr", lambda g: FiraAdamW(g), r"written by GaLoreAdamW into FiraAdamW"),
    ("fira8bit", lambda g: DCTAdamW(g), r"written by FiraAdamW into DCTAdamW"),
])
def test_checkpoint_recording_its_method_resumes(name, other, match):
    """A state dict that records its writer (``data/identity``: method, FRUGAL's mode, a projector in every
    group) loads into its method exactly, resumes to the parameters its writer reached, and is refused by
    another method."""
    from .data.identity.make_identity_checkpoints import CASES

    ckpt = torch.load(IDENTITY / f"{name}.pt", weights_only=True)
    model = resume_checkpoint(ckpt, CASES[name])
    # Exact on the CPU that wrote them; the tolerance is test_state_dict.py's for another CPU's rounding.
    for p, expected in zip(model.parameters(), ckpt["after"]):
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-3)
    _assert_refused_unchanged(other(groups(mlp())), ckpt["opt"], match)
