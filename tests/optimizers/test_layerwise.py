"""Layer-wise stepping equals the ordinary step, with an LR scheduler and with accumulation."""

import pytest
import torch

from slimtrain.optimizers import FrugalAdamW, GaLoreAdamW, LayerwiseStepper

from .helpers import batches, groups, mlp


def _sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


@pytest.mark.parametrize("accum", [1, 2])
def test_layerwise_matches_regular_step(accum):
    a, b = mlp(), mlp()
    opt_a, opt_b = GaLoreAdamW(groups(a), lr=1e-2), GaLoreAdamW(groups(b), lr=1e-2)
    sched_a, sched_b = _sched(opt_a), _sched(opt_b)
    stepper = LayerwiseStepper(opt_b, accumulation_steps=accum)
    data = list(batches(12 * accum))
    for i in range(12):
        opt_a.zero_grad()
        for x, y in data[i * accum : (i + 1) * accum]:
            (((a(x) - y) ** 2).mean() / accum).backward()
            (((b(x) - y) ** 2).mean() / accum).backward()  # b steps inside backward
        opt_a.step()
        sched_a.step()
        sched_b.step()
        assert all(p.grad is None for p in b.parameters())  # gradients freed as they are used
    stepper.remove()
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]  # scheduler counted once per step
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_block_mode_refused():
    with pytest.raises(RuntimeError, match=r"FrugalAdamW cannot run layer-wise: FrugalAdamW\(mode='block'\) chooses"):
        LayerwiseStepper(FrugalAdamW(groups(mlp()), mode="block"))


def test_bad_accumulation_steps():
    with pytest.raises(ValueError, match=r"Invalid accumulation_steps: 0"):
        LayerwiseStepper(GaLoreAdamW(groups(mlp())), accumulation_steps=0)


def test_model_other_than_ddp_refused():
    model = mlp()
    with pytest.raises(RuntimeError, match=r"takes a torch\.nn\.parallel\.DistributedDataParallel model or an FSDP2 \(fully_shard\) model, got Sequential"):
        LayerwiseStepper(GaLoreAdamW(groups(model)), model=model)
