"""Every optimizer configuration trains the same with the Triton kernels as with their torch
references: the code above the kernels is one path, and only the backend differs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from slimtrain import kernels
from slimtrain.optimizers import FiraAdamW
from slimtrain.optimizers.fira import FiraRule

from .._device import DEVICE
from ..optimizers.helpers import CONFIGS, groups, mlp, train

STEPS = 12  # crosses two projector refreshes (gap 5)


def _train(factory, backend: str, dtype=torch.float32):
    model = mlp(dtype=dtype).to(DEVICE)
    opt = factory(groups(model))
    with kernels.use_backend(backend):
        loss = train(model, opt, STEPS)
    return model, loss


@pytest.mark.parametrize("name, factory", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_triton_backend_trains_like_the_torch_backend(name, factory):
    ref_model, ref_loss = _train(factory, "torch")
    model, loss = _train(factory, "triton")
    # fp32 rounding differences (another accumulation order) over 12 steps at lr 1e-2: at most 2.1e-7
    # measured. The 8-bit rows differ more: the kernel rounds moments to the nearest code and
    # bitsandbytes' CPU quantizer, which the reference uses, does not always (kernels/adam8bit.py);
    # one code of a moment is up to 1.4% of its block's absmax. Measured at most 7.5e-4 (sst8bit).
    tol = 2e-3 if "8bit" in name else 1e-6
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=tol)
    assert abs(loss - ref_loss) <= tol


def test_kernels_were_really_used():
    _train(CONFIGS[4][1], "triton")  # Fira: Adam, the fused apply with a residual, its row norms
    used = kernels.backends_used()
    for op in ("adam_direction", "lowrank_apply", "residual_row_sq_norms"):
        assert used[(op, DEVICE.type)] == "triton", used


class _RecordingFiraRule(FiraRule):
    """Fira's rule, recording whether each residual it hands the apply carries the materialized ``G - c R B``,
    and with ``two_pass`` dropping it, so the apply recomputes ``R B`` as the torch path did before it kept it."""

    def __init__(self, two_pass: bool = False):
        self.two_pass, self.kept = two_pass, []

    def residual(self, *args):
        residual = super().residual(*args)
        self.kept.append(residual.materialized is not None)
        return dataclasses.replace(residual, materialized=None) if self.two_pass else residual


def _RecordingFira(*args, two_pass: bool = False, **kwargs) -> FiraAdamW:
    opt = FiraAdamW(*args, rule=_RecordingFiraRule(two_pass), **kwargs)
    opt.kept = opt.rule.kept
    return opt


@pytest.mark.parametrize("dtype, kwargs", [
    (torch.float32, {"weight_decay": 0.01}),  # the fused apply
    (torch.float32, {"projector": "dct", "residual": "fira_code"}),
    (torch.float32, {"projector": "columns"}),  # no dense basis: the materialized update
    (torch.bfloat16, {"bf16_stochastic_round": True}),  # dense basis, materialized update
], ids=["svd", "dct-fira_code", "columns", "bf16-sr"])
def test_fira_on_the_torch_backend_computes_its_residual_once_and_the_same(dtype, kwargs):
    runs = []
    for two_pass in (False, True):
        model = mlp(dtype=dtype).to(DEVICE)
        opt = _RecordingFira(groups(model), lr=1e-2, two_pass=two_pass, **kwargs)
        with kernels.use_backend("torch"):
            train(model, opt, STEPS)
        assert opt.kept and all(opt.kept)
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        assert torch.equal(p, q)


def test_fira_on_the_triton_backend_keeps_no_residual():
    model = mlp().to(DEVICE)
    opt = _RecordingFira(groups(model), lr=1e-2)
    with kernels.use_backend("triton"):
        train(model, opt, 2)
    assert opt.kept and not any(opt.kept)
