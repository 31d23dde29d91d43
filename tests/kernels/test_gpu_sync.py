"""No hidden host synchronization in an ordinary optimizer step on a GPU.

A GPU step should only queue work. Each read of a GPU value on the host (``bool()``, ``int()``, ``.item()``,
a copy from pageable memory) stalls the CPU until the GPU has caught up, so the step's launches no longer
overlap the tail of the backward pass. The ordinary step (no projector refresh) of every optimizer
configuration, fp32 and 8-bit, every projector, is run with ``torch.cuda.set_sync_debug_mode("warn")``
and its synchronizations counted. The only ones allowed are the documented ones
(``docs/kernels.md``, "Host synchronizations"):

* one per ``step()``: the non-finite gradient check, one reduction over all gradients read once;
* with 8-bit states, one per refused-overflow check of a requantized moment (two per 8-bit Adam call),
  counted here by wrapping the check itself, so any other read still fails the test.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from slimtrain.kernels import _bnb

from .._device import DEVICE, needs_gpu
from ..optimizers.helpers import CONFIGS, batches, groups, mlp

pytestmark = needs_gpu


def _syncs_during(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("name, factory", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_ordinary_step_synchronizes_only_where_documented(name, factory, monkeypatch):
    model = mlp().to(DEVICE)
    opt = factory(groups(model))  # refresh gap 5: step 1 refreshes, steps 2-4 are ordinary
    data = [(x.to(DEVICE), y.to(DEVICE)) for x, y in batches(4)]
    overflow_checks = []
    check = _bnb.refuse_nonfinite

    def counted(*args, **kwargs):
        overflow_checks.append(1)
        return check(*args, **kwargs)

    monkeypatch.setattr(_bnb, "refuse_nonfinite", counted)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        if i == 0:
            opt.step()  # the first step builds state and refreshes: not an ordinary step
            continue
        overflow_checks.clear()
        syncs = _syncs_during(opt.step)
        assert syncs == 1 + len(overflow_checks), (
            f"{name}: step {i + 1} synchronized {syncs} times; documented: 1 non-finite check + "
            f"{len(overflow_checks)} 8-bit overflow checks"
        )
