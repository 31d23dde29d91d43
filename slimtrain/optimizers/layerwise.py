"""Layer-wise updates: step each parameter as soon as its gradient is final, and free the gradient."""

from __future__ import annotations

import sys
import weakref

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .._validation import check_int
from ._validation import is_dtensor
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
    ``optimizer.step()`` pass.

    **FSDP2.** Under ``fully_shard`` pass the sharded model, ``LayerwiseStepper(opt, model=fsdp_model)``:
    FSDP2 runs each parameter's post-accumulate-grad hook on its reduced sharded gradient, where the stepper
    steps this rank's piece (``docs/fsdp.md``) and frees it, so a rank holds the sharded gradients of one
    ``fully_shard`` group at a time instead of all of them. ``accumulation_steps=k`` works as in one process:
    FSDP2 reduce-scatters each backward pass and the sharded gradients add up over the window. Other wrappers
    are refused: under DeepSpeed ZeRO use :func:`slimtrain.sharding.initialize` and call ``step()``.

    **Gradient norm and clipping.** :attr:`grad_norm` is the norm of the whole gradient each window stepped on
    (every rank's pieces under FSDP2: one all-reduce of a scalar per window), as ``clip_grad_norm_`` returns it:
    log it where ``optimizer.step()`` runs would log theirs. It is known only once the last parameter has been
    stepped, so it cannot scale this window's updates: in this mode nothing is clipped by the global norm. Clip
    the loss scale instead, or train with ``optimizer.step()`` where clipping matters.

    **Parameters that start training later.** The stepper follows the optimizer, not the parameters it saw
    when built: at the start of every backward pass it steps, it also hooks every parameter of the
    optimizer's groups that requires grad by then (unfrozen since, or added with ``add_param_group``),
    and such a parameter trains from that backward pass on, as with ``optimizer.step()``. A backward pass
    is seen when it reaches a parameter the stepper already steps; one that reaches only parameters
    unfrozen since the previous pass is not (nothing of the stepper's runs in it): unfreeze new parameters
    while others still train, or build the stepper after unfreezing.

    **Accumulation.** With ``accumulation_steps=k`` the stepper counts backward passes (each autograd run
    that reaches its parameters), not gradient arrivals: backward passes ``k*i`` to ``k*i + k - 1`` form
    a window, and a parameter is stepped once per window on what it accumulated in it, exactly as
    ``loss.backward()`` k times, then ``optimizer.step()`` and ``zero_grad()`` would: in its hook during the
    window's last backward pass, or, if it got gradients earlier in the window but none in the last one
    (a branch or an expert that did not run), when that backward pass ends. A reentrant activation
    checkpoint (``torch.utils.checkpoint(..., use_reentrant=True)``) runs a backward pass of its own inside
    the outer one; when a pass's first gradient arrives in there, the end of the outer pass cannot be seen, so
    with ``k > 1`` that is refused (use ``use_reentrant=False``, transformers' default); ``k = 1`` is exact
    either way.

    Args:
        optimizer: a slimtrain optimizer (FRUGAL's block mode is refused: choosing the active blocks
            needs the whole step).
        accumulation_steps: with k > 1, gradients accumulate over k backward passes and each parameter
            is stepped at the end of each window of k (scale the loss by 1/k as usual); they are held in
            between. Under DDP it must be 1 (accumulate with ``no_sync()``).
        model: the ``DistributedDataParallel`` or FSDP2 (``fully_shard``) model in a multi-process run (required
            there), else None.
            ``find_unused_parameters=True`` is refused (DDP would hand this stepper zeros for unused
            parameters, which Adam's momentum still moves). DDP averages only the parameters that
            required grad when it was built: a parameter of the optimizer that gets a gradient outside
            DDP's buckets is refused at the end of that backward pass (its gradient is one rank's alone).

    Don't call ``optimizer.step()`` or ``zero_grad()`` yourself in this mode. Under DDP, a stepper's
    communication hook stays installed after :meth:`remove` (DDP cannot uninstall one); it then only
    averages the gradients, as DDP's own.
    """

    def __init__(self, optimizer: LowRankAdamW, accumulation_steps: int = 1, *, model: nn.Module | None = None):
        if not isinstance(optimizer, LowRankAdamW):
            raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} (expected a slimtrain optimizer)")
        check_int("accumulation_steps", accumulation_steps, minimum=1)
        if not optimizer.rule.capabilities.layerwise:
            raise RuntimeError(f"{type(optimizer).__name__} cannot run layer-wise: {optimizer.rule.capabilities.reason}")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self._hooks: dict[int, RemovableHandle] = {}  # id(parameter) -> its post-accumulate-grad hook
        self._backward_passes = 0  # backward passes seen (single process)
        self._running = _no_pass  # a weak reference to the end-of-backward callback of the pass running now
        self._fsdp = None  # the fully_shard model under FSDP2
        self._norm_sq: Tensor | float = 0.0  # the window's squared gradient norm so far (this rank's pieces)
        #: The norm of the whole gradient the last window stepped on (a 0-d tensor; ``None`` before the first).
        self.grad_norm: Tensor | None = None
        self._ddp = self._check_data_parallel(model)
        self._active = True
        if self._ddp is not None:
            self._clear_queued = False
            self._stepped_now: set[int] = set()
            self._ddp.register_comm_hook(self._ddp.process_group, self._comm_hook)
            return
        if not self._trainable():
            count = sum(len(g["params"]) for g in optimizer.param_groups)
            raise RuntimeError(
                f"LayerwiseStepper found none of the optimizer's {count} parameters requiring grad, so no backward "
                "pass would ever reach it: unfreeze the parameters to train before building the stepper"
            )
        self._hook_new_parameters()

    def _params(self) -> list[Tensor]:
        """The optimizer's parameters, in its order, as they are now (groups may have been added)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _trainable(self) -> list[Tensor]:
        return [p for p in self._params() if p.requires_grad]

    def _check_data_parallel(self, model: nn.Module | None) -> nn.parallel.DistributedDataParallel | None:
        ddp_type = nn.parallel.DistributedDataParallel
        if model is not None and _is_fully_sharded(model):
            self._check_sharded(model)
            self._fsdp = model
            return None
        if model is not None and not isinstance(model, ddp_type):
            raise RuntimeError(
                f"LayerwiseStepper(model=...) takes a torch.nn.parallel.DistributedDataParallel model or an FSDP2 "
                f"(fully_shard) model, got {type(model).__name__}. Under DeepSpeed ZeRO use "
                "slimtrain.sharding.initialize(...) with a regular optimizer.step(); in one process pass no model"
            )
        if model is None:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise RuntimeError(
                    f"LayerwiseStepper in a run of {dist.get_world_size()} processes would step each parameter on "
                    "its local gradient, before data parallelism averages it: pass the data-parallel model, "
                    "LayerwiseStepper(opt, model=ddp_model) (torch.nn.parallel.DistributedDataParallel) or "
                    "LayerwiseStepper(opt, model=fsdp_model) (fully_shard), or use a regular optimizer.step() "
                    "(DeepSpeed ZeRO: slimtrain.sharding.initialize)"
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
        outside = [tuple(p.shape) for p in self._trainable() if id(p) not in in_model]
        if outside:
            raise RuntimeError(
                f"The optimizer holds parameters that the DistributedDataParallel model does not (shapes "
                f"{outside[:4]}): under DDP the stepper only sees the model's gradients. Give the optimizer the "
                "model's parameters only"
            )
        return model

    def _check_sharded(self, model: nn.Module) -> None:
        """Under FSDP2 every parameter the stepper steps must be one of the model's (a ``DTensor`` whose reduced
        gradient FSDP2 hands to its hook); a tensor outside it would be stepped on one rank's gradient."""
        in_model = {id(p) for p in model.parameters()}
        outside = [tuple(p.shape) for p in self._trainable() if id(p) not in in_model]
        if outside:
            raise RuntimeError(
                f"The optimizer holds parameters that the fully_shard model does not (shapes {outside[:4]}): under "
                "FSDP2 the stepper steps only the model's sharded parameters, on their reduced gradients. Give the "
                "optimizer the model's parameters only (build it after fully_shard)"
            )

    # One process (and FSDP2): a hook per parameter, a callback at the end of each backward pass ----
    def _hook_new_parameters(self) -> None:
        for p in self._trainable():
            if id(p) not in self._hooks:
                self._hooks[id(p)] = p.register_post_accumulate_grad_hook(self._hook)

    def _window_ends(self) -> bool:
        """Whether the backward pass now running is the last of its accumulation window."""
        return self._backward_passes % self.accumulation_steps == 0

    def _hook(self, p: Tensor) -> None:
        if not self._active:
            return
        if self._running() is None:
            self._begin_backward()
        if self._window_ends():
            self._step(p)

    def _begin_backward(self) -> None:
        """The first gradient of a backward pass has arrived: count the pass, hook the parameters that require
        grad since the previous one (their hooks fire later in this pass; a gradient that arrived before is
        stepped at its end), and have the engine call :meth:`_end_backward` when the pass is over."""
        if self.accumulation_steps > 1 and _inside_reentrant_checkpoint():
            raise RuntimeError(
                f"LayerwiseStepper(accumulation_steps={self.accumulation_steps}) got the first gradient of a backward "
                "pass inside a reentrant activation checkpoint's own backward pass, so it cannot tell where the "
                "outer pass ends: checkpoint with use_reentrant=False (transformers: "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})), or "
                "use accumulation_steps=1"
            )
        end = _EndOfBackward(self)
        self._running = weakref.ref(end)
        self._backward_passes += 1
        self._hook_new_parameters()
        torch.autograd.Variable._execution_engine.queue_callback(end)

    def _end_backward(self, end: _EndOfBackward) -> None:
        if self._running() is not end:
            return
        self._running = _no_pass
        if self._window_ends():
            # what optimizer.step() would step now: every parameter still holding a gradient of this window
            for p in self._params():
                if p.grad is not None:
                    self._step(p)
            self._finish_window()

    def _finish_window(self) -> None:
        """The window's gradient norm, over every rank's pieces under FSDP2 (one all-reduce)."""
        total = torch.as_tensor(self._norm_sq, dtype=torch.float32)
        if self._fsdp is not None and dist.get_world_size() > 1:
            total = total.reshape(1).clone()
            dist.all_reduce(total)
            total = total.reshape(())
        self.grad_norm = total.sqrt()
        self._norm_sq = 0.0

    def _step(self, p: Tensor) -> None:
        self._count_norm(p, p.grad)
        self.optimizer.step_param(p)
        p.grad = None
        self._stepped()

    def _count_norm(self, p: Tensor, grad: Tensor) -> None:
        """Add ``grad``'s squared norm to the window's: a sharded parameter's piece on every rank, a parameter that
        every rank holds whole (replicated) on the first rank only."""
        if is_dtensor(grad):
            from torch.distributed.tensor import Shard

            if not any(isinstance(pl, Shard) for pl in p.placements) and dist.get_rank() != 0:
                return
            grad = grad.to_local()
        self._norm_sq = self._norm_sq + grad.float().square().sum()

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
        mine = {id(p) for p in self._trainable()}  # the optimizer's groups now, add_param_group included

        def step_bucket(fut):
            for p, grad in zip(bucket.parameters(), bucket.gradients()):
                if id(p) in mine:
                    p.grad = grad  # a view of the averaged bucket: the gradient this step is on
                    self._count_norm(p, grad)
                    self.optimizer.step_param(p)
                    self._stepped_now.add(id(p))
            self._stepped()
            return fut.value()

        return averaged.then(step_bucket)

    def _free_grads(self) -> None:
        stepped, self._stepped_now = self._stepped_now, set()
        self._clear_queued = False
        self._finish_window()  # DDP's averaged gradients are whole on every rank: no sum across ranks
        unaveraged = []
        for p in self._params():
            if id(p) in stepped:
                p.grad = None
            elif p.grad is not None:
                unaveraged.append(tuple(p.shape))
        if unaveraged:
            raise RuntimeError(
                f"LayerwiseStepper got gradients for {len(unaveraged)} parameters of the optimizer that "
                f"DistributedDataParallel does not average (shapes {unaveraged[:4]}): DDP reduces only the parameters "
                "that required grad when it was built. Build DDP after unfreezing (or after add_param_group), so "
                "that every rank steps on the averaged gradient"
            )

    def remove(self) -> None:
        """Detach the hooks (the optimizer goes back to ordinary ``step()`` use)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._active = False


def _no_pass() -> None:
    return None


def _is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is FSDP2's (``fully_shard`` turns it into an ``FSDPModule``)."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _inside_reentrant_checkpoint() -> bool:
    """Whether this code runs inside the backward pass that ``torch.utils.checkpoint(..., use_reentrant=True)``
    starts within the outer one (its ``CheckpointFunction.backward`` is on the Python stack). A callback queued
    there runs when that inner pass ends, not the outer one."""
    from torch.utils.checkpoint import CheckpointFunction

    code = CheckpointFunction.backward.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class _EndOfBackward:
    """Queued on the autograd engine by the first hook of a backward pass; the engine calls it when the pass ends.

    The stepper holds it by weak reference only: the engine drops the callbacks of a pass that raised (an
    out-of-memory error caught by the training loop), so such a pass stops counting as running and the next
    backward pass is a new one.
    """

    __slots__ = ("stepper", "__weakref__")

    def __init__(self, stepper: LayerwiseStepper):
        self.stepper = stepper

    def __call__(self) -> None:
        self.stepper._end_backward(self)
