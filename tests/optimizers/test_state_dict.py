"""Checkpoints hold tensors and numbers only, and a resumed run continues bit for bit."""

import io
from pathlib import Path

import pytest
import torch

from .helpers import CONFIGS, groups, mlp, resume_checkpoint, train


@pytest.mark.parametrize("factory", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_resume_is_exact_across_refresh(factory):
    # gap 5: the save at step 7 is between refreshes, and the resumed part crosses two more.
    full = mlp()
    opt_full = factory(groups(full))
    train(full, opt_full, steps=18)

    first = mlp()
    opt_first = factory(groups(first))
    train(first, opt_first, steps=7)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt_first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # no pickled Python objects anywhere

    resumed = mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = factory(groups(resumed))
    opt_resumed.load_state_dict(ckpt["opt"])
    train(resumed, opt_resumed, steps=11, start=7)

    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(full.parameters(), resumed.parameters()):
        s1, s2 = opt_full.state[p], opt_resumed.state[q]
        assert s1.keys() == s2.keys()
        for k in s1:
            if isinstance(s1[k], torch.Tensor):
                assert s1[k].dtype == s2[k].dtype, k
                assert torch.equal(s1[k], s2[k]), k


@pytest.mark.parametrize("factory", [c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_state_dict_holds_only_tensors_and_numbers(factory):
    model = mlp()
    opt = factory(groups(model))
    train(model, opt, steps=3)
    allowed = (torch.Tensor, int, float, bool, str, type(None))

    def walk(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        else:
            assert isinstance(obj, allowed), type(obj)

    walk(opt.state_dict())


DATA = Path(__file__).parent / "data"
EARLIER = sorted(f.stem for f in DATA.glob("*.pt"))


@pytest.mark.parametrize("name", EARLIER)
def test_checkpoint_of_earlier_version_resumes(name):
    """A checkpoint written at commit e556968 (``data/make_checkpoints.py``) loads with weights_only, bit
    for bit, and resumes to the parameters that code reached: the format keeps its meaning."""
    from .data.make_checkpoints import CASES

    ckpt = torch.load(DATA / f"{name}.pt", weights_only=True)
    model = resume_checkpoint(ckpt, CASES[name])
    # Exact on the CPU that wrote them. Another CPU may round matmuls and SVDs differently: perturbing
    # every gradient by 1e-6 relative moves these 11 steps by at most 5e-5 (FRUGAL's sign residual at
    # near-zero entries), while a misread state (moments zeroed) moves them by >= 3.5e-2.
    for p, expected in zip(model.parameters(), ckpt["after"]):
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-3)
