"""Layer-wise updates: step each parameter inside its gradient hook and free its gradient at once."""

from __future__ import annotations

from torch import Tensor

from . import _validation as V
from .base import LowRankAdamW


class LayerwiseStepper:
    """Runs ``optimizer``'s update for each parameter as soon as its gradient is ready, then frees it.

    Full gradients for the whole model are never held at once: at most one parameter's gradient (plus
    autograd's in-flight buffers) lives at a time, which is what lets GaLore pre-train a 7B model on a
    24 GB card. One optimizer holds all parameters, so an LR scheduler attached to it is stepped once
    per training step as usual (the original GaLore script built one optimizer per parameter and had
    to double its scheduler's step counts to compensate).

    Usage::

        opt = GaLoreAdamW(groups, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, ...)
        stepper = LayerwiseStepper(opt, accumulation_steps=1)
        for batch in data:
            model(**batch).loss.backward()     # parameters are updated during backward
            sched.step()
        stepper.remove()

    Args:
        optimizer: a slimtrain optimizer (FRUGAL's block mode is refused: choosing the active blocks
            needs the whole step).
        accumulation_steps: with k > 1, gradients accumulate over k backward passes and each parameter
            is stepped on the k-th (scale the loss by 1/k as usual); they are held in between.

    Don't call ``optimizer.step()`` or ``zero_grad()`` yourself in this mode.
    """

    def __init__(self, optimizer: LowRankAdamW, accumulation_steps: int = 1):
        if not isinstance(optimizer, LowRankAdamW):
            raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected a slimtrain optimizer)")
        V.check_int("accumulation_steps", accumulation_steps, minimum=1)
        if getattr(optimizer, "mode", None) == "block":
            raise RuntimeError(
                "FrugalAdamW(mode='block') cannot run layer-wise: choosing the active blocks needs the whole "
                "step. Use mode='subspace' or a regular optimizer.step()."
            )
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self._calls: dict[int, int] = {}
        self._handles = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, p: Tensor) -> None:
        calls = self._calls.get(id(p), 0) + 1
        self._calls[id(p)] = calls
        if calls % self.accumulation_steps:
            return
        self.optimizer.step_param(p)
        p.grad = None
        # torch's LR schedulers warn unless the optimizer's step() ran before theirs; here the
        # optimizer did step, parameter by parameter, so set the flag their step() wrapper would.
        self.optimizer._opt_called = True

    def remove(self) -> None:
        """Detach the hooks (the optimizer goes back to ordinary ``step()`` use)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
