"""slimtrain optimizers inside Hugging Face ``Trainer``, with or without DeepSpeed ZeRO.

Build the optimizer from the model with a factory, and add the callback for logs (and, under
ZeRO >= 1, to hook the optimizer into the engine)::

    from slimtrain.integrations import SlimtrainCallback, optimizer_factory

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(optimizer_factory("galore", ["attn", "mlp"], rank=128),
                                                {"lr": 1e-2}),
                      callbacks=[SlimtrainCallback()])

Why a factory and not ``Trainer(optimizers=(opt, sched))``: under DeepSpeed the Trainer drops an
optimizer instance and builds its own (``deepspeed_init`` sets ``trainer.optimizer = None``, then
``deepspeed_optim_sched`` calls ``trainer.create_optimizer()``). ``create_optimizer`` calls a factory
as ``factory()(model, **kwargs)`` (``transformers.trainer_optimizer.is_optimizer_factory``: anything that
is not an ``Optimizer`` subclass), and does so before DeepSpeed flattens the parameters, so the factory
still sees the linear layers by name and shape.

Under ZeRO stage 1, 2 or 3 the factory returns a :class:`~slimtrain.sharding.ZeroLowRankOptimizer`
around the slimtrain optimizer (ZeRO steps flat partitions; the wrapper reassembles the matrices, see
:mod:`slimtrain.sharding.zero`). The wrapper must be attached to the ZeRO optimizer once the engine
exists, which happens inside ``Trainer.train`` after ``accelerator.prepare``; ``SlimtrainCallback``
does it in ``on_train_begin``. Without the callback the first step raises and says so. With
``trainer.train(resume_from_checkpoint=...)`` DeepSpeed loads the optimizer state before that; the wrapper
keeps it and loads it when it is attached, so a resumed run continues exactly as the uninterrupted one.

Note the lr: with ``optimizer_cls_and_kwargs`` the Trainer passes only the tuple's kwargs, so
``TrainingArguments.learning_rate`` is *not* the optimizer's lr: put ``lr`` in the kwargs (the Trainer's
scheduler then scales it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from ..optimizers import OPTIMIZERS, LowRankAdamW, low_rank_param_groups
from ..sharding.zero import FORMAT, ZeroLowRankOptimizer

# Keys of low_rank_param_groups (they shape the projected group); every other keyword is the optimizer's.
GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "exclude")


def _resolve(name_or_cls: str | type) -> type:
    if isinstance(name_or_cls, str) and name_or_cls in OPTIMIZERS:
        return OPTIMIZERS[name_or_cls]
    if isinstance(name_or_cls, type) and issubclass(name_or_cls, LowRankAdamW):
        return name_or_cls
    raise ValueError(
        f"Invalid optimizer: {name_or_cls!r} (expected one of {', '.join(OPTIMIZERS)} or a LowRankAdamW subclass)"
    )


def _deepspeed_config() -> dict | None:
    """The DeepSpeed config of the Trainer being set up, if any (transformers keeps a weak reference to
    it from ``TrainingArguments(deepspeed=...)`` on)."""
    try:
        from transformers.integrations.deepspeed import deepspeed_config
    except ImportError:  # pragma: no cover - transformers without the deepspeed integration module
        return None
    return deepspeed_config()


class TrainerZeroOptimizer(ZeroLowRankOptimizer):
    """The ZeRO wrapper as the Trainer gets it: it remembers the stage so a callback can attach it.

    ``trainer.train(resume_from_checkpoint=...)`` has DeepSpeed load the checkpoint (``deepspeed_load_checkpoint``)
    as soon as the engine exists, before ``on_train_begin`` attaches this wrapper, and the saved state can only be
    placed once the wrapper knows this rank's partitions. So an unattached wrapper keeps the state it is given
    and loads it when it is attached, before the first step.
    """

    def __init__(self, inner: LowRankAdamW, stage: int):
        super().__init__(inner)
        self.zero_stage = stage
        self._state_to_load: dict | None = None

    def load_state_dict(self, state_dict: dict) -> None:
        if self._units:
            super().load_state_dict(state_dict)
            return
        if not isinstance(state_dict, dict) or state_dict.get("format") != FORMAT:
            raise RuntimeError(
                "Not a slimtrain ZeRO optimizer checkpoint (saved by another optimizer or an elastic checkpoint)"
            )
        self._state_to_load = state_dict

    def attach(self, zero_optimizer, stage: int) -> None:
        super().attach(zero_optimizer, stage)
        state, self._state_to_load = self._state_to_load, None
        if state is not None:
            super().load_state_dict(state)

    def step(self, closure=None):
        if not self._units:
            raise RuntimeError(
                "The slimtrain optimizer is not attached to the DeepSpeed engine: pass "
                "callbacks=[slimtrain.integrations.SlimtrainCallback()] to the Trainer (it attaches the optimizer "
                "when training begins), or use deepspeed=None"
            )
        return super().step(closure)


class OptimizerFactory:
    """What :func:`optimizer_factory` returns; ``factory()(model, **kwargs)`` builds the optimizer."""

    def __init__(self, cls: type, target_modules: str | list[str], group_options: dict, optimizer_options: dict):
        self.cls, self.target_modules = cls, target_modules
        self.group_options, self.optimizer_options = group_options, optimizer_options

    def __call__(self) -> Callable[..., torch.optim.Optimizer]:
        return self.build

    def build(self, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
        """The optimizer for ``model``: ``low_rank_param_groups`` then the class; wrapped for ZeRO >= 1."""
        groups_kw = {**self.group_options, **{k: kwargs.pop(k) for k in GROUP_KEYS if k in kwargs}}
        groups = low_rank_param_groups(model, self.target_modules, **groups_kw)
        config = _deepspeed_config()
        if config is not None and any(hasattr(p, "ds_id") for g in groups for p in g["params"]):
            # from_pretrained under a ZeRO-3 config builds the model inside deepspeed.zero.Init: the
            # factory would see (0,)-shaped placeholders, and matrix shapes are what it needs.
            raise RuntimeError(
                "optimizer_factory got parameters already partitioned by deepspeed.zero.Init (the model was "
                "loaded after TrainingArguments(deepspeed=<stage 3 config>) was created): load the model first, "
                "then create the TrainingArguments, or use zero_optimization.stage 1 or 2"
            )
        optimizer = self.cls(groups, **{**self.optimizer_options, **kwargs})
        if config is None:
            return optimizer
        from ..sharding.api import check_config

        stage = check_config(config, optimizer)
        return optimizer if stage == 0 else TrainerZeroOptimizer(optimizer, stage)

    def __repr__(self) -> str:
        options = {**self.group_options, **self.optimizer_options}
        return f"optimizer_factory({self.cls.__name__}, {self.target_modules!r}, **{options!r})"


def optimizer_factory(
    name_or_cls: str | type, target_modules: str | list[str] = "all-linear", **hparams
) -> OptimizerFactory:
    """A factory for ``Trainer(optimizer_cls_and_kwargs=(factory, kwargs))`` that builds a slimtrain optimizer.

    The Trainer calls ``factory()(model, **kwargs)`` with the model before any DeepSpeed wrapping; the
    factory splits its parameters with :func:`~slimtrain.optimizers.low_rank_param_groups` and returns
    the optimizer (under DeepSpeed ZeRO >= 1, wrapped for ZeRO; add :class:`SlimtrainCallback`).

    Args:
        name_or_cls: a key of :data:`slimtrain.optimizers.OPTIMIZERS` (``"galore"``, ``"fira"``,
            ``"frugal"``, ``"dct"``, ``"sst"``, their ``...8bit`` twins) or a ``LowRankAdamW`` subclass.
        target_modules: which linear layers are projected (see ``low_rank_param_groups``; default
            ``"all-linear"``, which leaves out ``lm_head``/``classifier``/``score``).
        hparams: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``, ``exclude`` shape the projected
            group; the rest (``lr``, ``weight_decay``, ``projector``, ...) go to the optimizer. The
            Trainer's kwargs (the tuple's second element) override both.

    Raises:
        ValueError: for an unknown optimizer name (now), or targets matching no layer (when built).
    """
    cls = _resolve(name_or_cls)
    names = isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules)
    if not (isinstance(target_modules, str) or names):
        raise ValueError(
            f"Invalid target_modules: {target_modules!r} (expected a list of strings, a regex or 'all-linear')"
        )
    group_options = {k: hparams.pop(k) for k in GROUP_KEYS if k in hparams}
    return OptimizerFactory(cls, target_modules, group_options, hparams)


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer | None:
    """The slimtrain optimizer under Accelerate / DeepSpeed wrappers (``.optimizer`` chains), or the
    innermost optimizer if none is ours. Stops at the first object that counts its own state
    (:class:`LowRankAdamW` or the ZeRO wrapper, whose state is the rank's share)."""
    o = optimizer
    while o is not None and not hasattr(o, "state_bytes") and hasattr(o, "optimizer"):
        o = o.optimizer
    return o


def _zero_parent(optimizer, target):
    """The object in the ``.optimizer`` chain whose ``.optimizer`` is ``target`` (DeepSpeed's ZeRO optimizer)."""
    o = optimizer
    while o is not None and hasattr(o, "optimizer"):
        if o.optimizer is target:
            return o
        o = o.optimizer
    return None


def _refreshes(state) -> int:
    total = 0
    stack = [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "proj_refreshes" and isinstance(v, Tensor):
                    total += int(v)
                elif isinstance(v, dict):
                    stack.append(v)
    return total


class SlimtrainCallback(TrainerCallback):
    """Adds to the Trainer's logs what a slimtrain optimizer knows about itself, and under DeepSpeed
    ZeRO >= 1 attaches the optimizer built by :func:`optimizer_factory` to the engine.

    Logged at every ``on_log`` (so in ``trainer.state.log_history``):

    - ``optim_state_MiB``: bytes of optimizer state tensors (``state_bytes()``; this rank's share under
      ZeRO), in MiB;
    - ``proj_refreshes``: subspace refreshes so far, summed over the projected matrices (this rank's);
    - ``skipped_steps``: steps skipped for a non-finite gradient.

    Works with ``optimizer_cls_and_kwargs=(optimizer_factory(...), ...)`` and with
    ``optimizers=(slimtrain_optimizer, scheduler)`` (the latter without DeepSpeed only). An optimizer
    that is not slimtrain's is left alone and nothing is logged.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        ours = unwrap_optimizer(optimizer)
        if isinstance(ours, TrainerZeroOptimizer) and not ours._units:
            zero = _zero_parent(optimizer, ours)
            if zero is None:
                raise RuntimeError(
                    "SlimtrainCallback found the slimtrain ZeRO wrapper but no DeepSpeed ZeRO optimizer around it; "
                    "was the Trainer built with TrainingArguments(deepspeed=...)?"
                )
            ours.attach(zero, ours.zero_stage)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        ours = unwrap_optimizer(optimizer)
        if logs is None or not isinstance(ours, (LowRankAdamW, ZeroLowRankOptimizer)):
            return
        extra = {
            "optim_state_MiB": round(ours.state_bytes() / 2**20, 4),
            "proj_refreshes": _refreshes(dict(ours.state)),
            "skipped_steps": int(ours.skipped_steps),
        }
        logs.update(extra)  # for the callbacks after this one (printer, TensorBoard, W&B)
        # Trainer.log appends a copy of `logs` to log_history *before* calling on_log (transformers 5.x).
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
