"""Glue between slimtrain and other training loops; for now Hugging Face ``Trainer``.

- :func:`optimizer_factory`: a slimtrain optimizer for ``Trainer(optimizer_cls_and_kwargs=(factory, kwargs))``,
  built from the model's named modules, also under ``TrainingArguments(deepspeed=...)`` with ZeRO 0-3;
- :class:`SlimtrainCallback`: optimizer-state MiB, projector refreshes and skipped steps in the Trainer's
  logs; attaches the ZeRO wrapper to the engine when training begins (and then loads the state of a
  checkpoint being resumed).

Needs ``transformers`` (imported here, not by ``import slimtrain``).
"""

from .trainer import OptimizerFactory, SlimtrainCallback, optimizer_factory, unwrap_optimizer

__all__ = ["OptimizerFactory", "SlimtrainCallback", "optimizer_factory", "unwrap_optimizer"]
