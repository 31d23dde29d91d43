"""Layer-wise updates: step each parameter as soon as its gradient is final, and free the gradient."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

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

    **Data parallel.** A parameter's local gradient is not the one to step on: under
    ``DistributedDataParallel`` pass the wrapped model, ``LayerwiseStepper(opt, model=ddp_model)``.
    The stepper then installs a DDP communication hook that averages each gradient bucket as DDP does
    and steps the bucket's parameters once their averaged gradient has arrived (overlapping the rest of
    the backward), so 2 ranks reach what one process reaches on both ranks' data. Accumulate with
    ``ddp_model.no_sync()`` for all but the last micro-batch, as with any DDP training. DDP's buckets hold
    a copy of every gradient, so under DDP the stepper saves no gradient memory, only the separate
    ``optimizer.step()`` pass. Other wrappers are refused: shard with DeepSpeed ZeRO through
    :func:`slimtrain.sharding.initialize` and call ``step()``.

    Args:
        optimizer: a slimtrain optimizer (FRUGAL's block mode is refused: choosing the active blocks
            needs the whole step).
        accumulation_steps: with k > 1, gradients accumulate over k backward passes and each parameter
            is stepped on the k-th (scale the loss by 1/k as usual); they are held in between. Under DDP
            it must be 1 (accumulate with ``no_sync()``).
        model: the ``DistributedDataParallel`` model in a multi-process run (required there), else None.
            ``find_unused_parameters=True`` is refused (DDP would hand this stepper zeros for unused
            parameters, which Adam's momentum still moves).

    Don't call ``optimizer.step()`` or ``zero_grad()`` yourself in this mode. Under DDP, a stepper's
    communication hook stays installed after :meth:`remove` (DDP cannot uninstall one); it then only
    averages the gradients, as DDP's own.
    """

    def __init__(self, optimizer: LowRankAdamW, accumulation_steps: int = 1, *, model: nn.Module | None = None):
        if not isinstance(optimizer, LowRankAdamW):
            raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected a slimtrain optimizer)")
        V.check_int("accumulation_steps", accumulation_steps, minimum=1)
        if not optimizer.rule.capabilities.layerwise:
            raise RuntimeError(f"{type(optimizer).__name__} cannot run layer-wise: {optimizer.rule.capabilities.reason}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self._calls: dict[int, int] = {}
        self._handles = []
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._ddp = self._check_data_parallel(model)
        self._active = True
        if self._ddp is not None:
            self._clear_queued = False
            self._ddp.register_comm_hook(self._ddp.process_group, self._comm_hook)
            return
        for p in self._params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _check_data_parallel(self, model: nn.Module | None) -> nn.parallel.DistributedDataParallel | None:
        ddp_type = nn.parallel.DistributedDataParallel
        if model is not None and not isinstance(model, ddp_type):
            raise RuntimeError(
                f"LayerwiseStepper(model=...) takes a torch.nn.parallel.DistributedDataParallel model, got "
                f"{type(model).__name__}. For sharded training use DeepSpeed ZeRO through "
                "slimtrain.sharding.initialize(...) with a regular optimizer.step(); in one process pass no model"
            )
        if model is None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise RuntimeError(
                    f"LayerwiseStepper in a run of {dist.get_world_size()} processes would step each parameter on "
                    "its local gradient, before data parallelism averages it: wrap the model in "
                    "torch.nn.parallel.DistributedDataParallel and pass it, LayerwiseStepper(opt, model=ddp_model), "
                    "or use a regular optimizer.step() (DeepSpeed ZeRO: slimtrain.sharding.initialize)"
                )
            return None
        if self.accumulation_steps != 1:
            raise RuntimeError(
                f"Invalid accumulation_steps: {self.accumulation_steps} with DistributedDataParallel (expected 1: "
                "accumulate under ddp_model.no_sync() for all but the last micro-batch; the stepper steps on "
                "the averaged gradient of the synchronized backward)"
            )
        if model.find_unused_parameters:
            raise RuntimeError(
                "LayerwiseStepper cannot run under DistributedDataParallel(find_unused_parameters=True): DDP "
                "passes zeros for unused parameters and Adam's momentum would still move them. Build DDP "
                "without it, or use a regular optimizer.step()"
            )
        in_model = {id(p) for p in model.parameters()}
        outside = [tuple(p.shape) for p in self._params if id(p) not in in_model]
        if outside:
            raise RuntimeError(
                f"The optimizer holds parameters that the DistributedDataParallel model does not (shapes "
                f"{outside[:4]}): under DDP the stepper only sees the model's gradients. Give the optimizer the "
                "model's parameters only"
            )
        return model

    def _hook(self, p: Tensor) -> None:
        calls = self._calls.get(id(p), 0) + 1
        self._calls[id(p)] = calls
        if calls % self.accumulation_steps:
            return
        self.optimizer.step_param(p)
        p.grad = None
        self._stepped()

    def _stepped(self) -> None:
        # torch's LR schedulers warn unless the optimizer's step() ran before theirs; here the
        # optimizer did step, parameter by parameter, so set the flag their step() wrapper would.
        self.optimizer._opt_called = True

    # DistributedDataParallel ------------------------------------------------------------------
    def _comm_hook(self, process_group, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        averaged = allreduce_hook(process_group, bucket)  # DDP's own arithmetic: divide, then sum
        if not self._active:
            return averaged
        if not self._clear_queued:
            # DDP writes the averaged gradients back into .grad when backward ends, after every
            # callback queued so far: free them in a callback queued after DDP's.
            self._clear_queued = True
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: engine.queue_callback(self._free_grads))
        mine = {id(p) for p in self._params}

        def step_bucket(fut):
            for p, grad in zip(bucket.parameters(), bucket.gradients()):
                if id(p) in mine:
                    p.grad = grad  # a view of the averaged bucket: the gradient this step is on
                    self.optimizer.step_param(p)
            self._stepped()
            return fut.value()

        return averaged.then(step_bucket)

    def _free_grads(self) -> None:
        for p in self._params:
            p.grad = None
        self._clear_queued = False

    def remove(self) -> None:
        """Detach the hooks (the optimizer goes back to ordinary ``step()`` use)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = False
