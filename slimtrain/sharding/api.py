"""``initialize``: ``deepspeed.initialize`` for a slimtrain optimizer, with its settings checked first."""

from __future__ import annotations

import copy
import json
import os

from ..optimizers.base import LowRankAdamW
from .zero import ZeroLowRankOptimizer


def _load_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise ValueError(f"Invalid config: {type(config).__name__} (expected a dict or a path to a DeepSpeed JSON file)")


def check_config(config: dict, optimizer: LowRankAdamW) -> int:
    """Refuse what the sharded step cannot do, naming the setting and what to use instead.

    Returns the ZeRO stage.
    """
    if not isinstance(optimizer, LowRankAdamW):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} (expected a slimtrain optimizer; "
            "call deepspeed.initialize directly for others)"
        )
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(
            f"Invalid zero_optimization: {zero!r} (expected an object such as {{\"stage\": 2}}, or no key for stage 0)"
        )
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"Invalid zero_optimization.stage: {stage!r} (expected 0, 1, 2 or 3)")
    if "optimizer" in config:
        raise ValueError(
            "Invalid config: it has an 'optimizer' section, which would make DeepSpeed build its own optimizer "
            "and ignore the slimtrain one. Remove the section and pass the optimizer here."
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(
                f"Unsupported zero_optimization.{key}.device: {device!r}: slimtrain optimizers step on the "
                "accelerator and need no offload; set it to 'none' (their low-rank state is already small)."
            )
    if zero.get("elastic_checkpoint"):
        raise ValueError(
            "Unsupported zero_optimization.elastic_checkpoint: true (low-rank state is split by matrix owner, "
            "not by ZeRO's element offsets); set it to false."
        )
    if config.get("fp16", {}).get("enabled"):
        raise ValueError("Unsupported fp16.enabled: true (dynamic loss scaling is not wired in); use bf16 or fp32")
    bf16 = next((key for key in ("bf16", "bfloat16") if (config.get(key) or {}).get("enabled")), None)
    if stage == 0 and bf16 is not None:
        # Measured with DeepSpeed 0.19.8: at stage 0 its BF16_Optimizer swaps flat fp32 copies of the weights
        # into the optimizer's param groups, and the first step (inside deepspeed.initialize) raises.
        raise ValueError(
            f"Unsupported {bf16}.enabled: true at zero_optimization.stage 0: DeepSpeed's bf16 optimizer hands "
            "the optimizer flat fp32 copies of the weights, which cannot be projected; use stage 1, 2 or 3 "
            "with bf16 (the same fp32 master weights, sharded), or disable bf16 at stage 0 (SSTAdamW and "
            "FrugalAdamW(mode='block') run at stage 0 only, so in fp32)."
        )
    if stage >= 1:
        if not optimizer.rule.capabilities.shardable:
            raise ValueError(f"Unsupported optimizer under zero_optimization.stage {stage}: "
                             f"{optimizer.rule.capabilities.reason}.")
        if any(g.get("bf16_stochastic_round") for g in optimizer.param_groups):
            # Measured with DeepSpeed 0.19.8 at stages 1, 2 and 3, bf16 enabled: the partitions handed to
            # step() are fp32, so _apply never rounds (0 calls) and the option would be silently ignored.
            raise ValueError(
                f"Unsupported bf16_stochastic_round=True under zero_optimization.stage {stage}: ZeRO steps fp32 "
                "partitions of the weights (fp32 master copies when bf16 is enabled, which DeepSpeed rounds to "
                "bf16 to nearest), so nothing would be rounded stochastically, and the fp32 masters already keep "
                "the small updates it exists to keep; set bf16_stochastic_round=False."
            )
    return stage


def initialize(*, model, optimizer: LowRankAdamW, config, **kwargs):
    """``deepspeed.initialize`` with a slimtrain optimizer under any ZeRO stage.

    Args:
        model: the ``torch.nn.Module``.
        optimizer: a slimtrain optimizer built on ``model``'s parameters (before this call).
        config: the DeepSpeed config, a dict or a JSON path, without an ``optimizer`` section.
        kwargs: passed to ``deepspeed.initialize`` (``lr_scheduler``, ``training_data``, ...).

    Returns:
        What ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader, lr_scheduler)``.

    Raises:
        ValueError: for a setting the sharded step does not support, before anything is built.
    """
    try:
        import deepspeed
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("slimtrain.sharding needs DeepSpeed: pip install 'slimtrain[deepspeed]'") from e
    config = _load_config(config)
    stage = check_config(config, optimizer)
    # DeepSpeed only trusts its own whitelist of optimizers; ours are tested under every stage here.
    config["zero_allow_untested_optimizer"] = True
    if stage == 0:
        return deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    wrapped = ZeroLowRankOptimizer(optimizer)
    engine, opt, loader, sched = deepspeed.initialize(model=model, optimizer=wrapped, config=config, **kwargs)
    wrapped.attach(engine.optimizer, stage)
    return engine, opt, loader, sched
