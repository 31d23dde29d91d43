"""What a run of the deepspeed recipe is: the pretrain recipe's options, the DeepSpeed config, their checks.

:func:`validate` checks a run's arguments in one pass, as the pretrain recipe does, then the DeepSpeed
config (``--zero N`` for a shipped ``ds_configs/zeroN.json``, or ``--ds-config PATH``): no ``optimizer`` or
``scheduler`` section (the recipe builds both), a ZeRO stage the optimizer can run at, bf16 only with
``--dtype bf16``, no fp16, batch sizes that agree with ``--batch-size`` on the ranks, and whatever
:func:`slimtrain.sharding.api.check_config` refuses. It runs in ``slimtrain deepspeed`` before the launch
and again in every rank; each refusal is a ``ValueError`` or ``FileNotFoundError`` naming the option.
"""

from __future__ import annotations

import argparse
import json
import os
from importlib import resources

import torch

from . import outputs, pretrain_options, runtime
from .optim import capabilities
from .pretrain import build_model_and_optimizer

DESCRIPTION = "The pretrain recipe under DeepSpeed ZeRO: same model, data, optimizers and outputs, on N ranks."
MODULE = "slimtrain.recipes.deepspeed"
STAGES = (1, 2, 3)
CHECKPOINT_DIR = "checkpoint"
LATEST = os.path.join(CHECKPOINT_DIR, "latest")  # DeepSpeed's name of the newest checkpoint: what --resume needs


def stage0_only(name: str) -> str | None:
    """Why the recipe's optimizer ``name`` cannot run under ZeRO stages >= 1 (its rule is not shardable), or None."""
    rule = capabilities(name)
    return None if rule is None or rule.shardable else rule.reason


def not_under_deepspeed(name: str) -> str | None:
    """Why the recipe's optimizer ``name`` cannot run under this recipe at any ZeRO stage, or None."""
    if name == "spectral-sst":
        return ("SpectralSSTAdamW steps the factors of to_spectral's layers, not a LowRankAdamW rule that "
                "slimtrain.sharding can shard; run it with slimtrain pretrain")
    return None


# Config keys the recipe derives from --batch-size and the number of ranks.
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What each rank parses: the pretrain recipe's options and the DeepSpeed config."""
    pretrain_options.add_arguments(parser)
    parser.add_argument("--zero", type=int, default=None, metavar="STAGE",
                        help="ZeRO stage 1, 2 or 3, with the config shipped in slimtrain/recipes/ds_configs "
                             "(default: 2)")
    parser.add_argument("--ds-config", default=None, metavar="JSON",
                        help="your DeepSpeed config instead of --zero (no optimizer or scheduler section)")
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``slimtrain deepspeed``: the recipe's options, and how many ranks to launch."""
    add_recipe_arguments(parser)
    parser.add_argument("--ranks", type=int, default=2, help="processes to launch: GPUs, or CPU ranks (default: 2)")
    parser.add_argument("--master-port", type=int, default=29500, help="rendezvous port (default: 29500)")
    parser.add_argument("--dry-run", action="store_true", help="print the deepspeed command without running it")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"deepspeed --num_gpus N --module {MODULE}", description=DESCRIPTION)
    add_recipe_arguments(parser)
    # The launcher appends --local_rank=I unless given --no_local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    cfg = parser.parse_args(argv)
    del cfg.local_rank  # not a run argument: a resumed run may get other local ranks
    return cfg


def validate(cfg: argparse.Namespace, world_size: int) -> dict:
    """Check every argument, as the pretrain recipe does, and return the DeepSpeed config to use.

    Raises ``ValueError``/``FileNotFoundError`` naming the argument, before anything heavy. The config's
    batch sizes are filled in from ``--batch-size`` and ``world_size``.
    """
    if cfg.zero is not None and cfg.ds_config is not None:
        raise ValueError(f"Invalid --zero {cfg.zero} with --ds-config: pick one (--zero N uses the shipped zeroN.json)")
    if cfg.ds_config is None:
        cfg.zero = 2 if cfg.zero is None else cfg.zero
        if cfg.zero not in STAGES:
            raise ValueError(f"Invalid --zero: {cfg.zero} (expected 1, 2 or 3)")
    if cfg.device != "auto":
        raise ValueError(f"Invalid --device: {cfg.device!r} with the deepspeed recipe (each rank runs on the "
                         "accelerator DeepSpeed gives it: its GPU, or the CPU with DS_ACCELERATOR=cpu); leave it out")
    runtime.check_dtype(cfg.dtype, "cpu")  # the name only: DeepSpeed checks its accelerator
    if cfg.dtype == "bf16-autocast":
        raise ValueError("Invalid --dtype: 'bf16-autocast' with the deepspeed recipe (DeepSpeed's bf16 already keeps "
                         "fp32 master weights of bf16 ones); use --dtype bf16")
    pretrain_options.validate(cfg, checkpoint=LATEST, resolve_device=False)
    if cfg.resume:
        check_checkpoint(os.path.join(cfg.out, CHECKPOINT_DIR))
    config = load_config(cfg.ds_config) if cfg.ds_config is not None else shipped_config(cfg.zero)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if not_under_deepspeed(cfg.optimizer):
        raise ValueError(f"Invalid --optimizer {cfg.optimizer} with the deepspeed recipe: {not_under_deepspeed(cfg.optimizer)}")
    if stage0_only(cfg.optimizer) and stage >= 1:
        raise ValueError(f"Invalid --optimizer {cfg.optimizer} at ZeRO stage {stage}: {stage0_only(cfg.optimizer)} "
                         "(stage 0: --ds-config)")
    if _enabled(config, "bf16") and cfg.dtype != "bf16":
        raise ValueError(f"Invalid --dtype: {cfg.dtype!r} with --ds-config {cfg.ds_config} enabling bf16: pass "
                         "--dtype bf16 (the recipe sets the config's bf16 section from --dtype)")
    if _enabled(config, "fp16"):
        raise ValueError(f"Invalid --ds-config: {cfg.ds_config} enables fp16, which the recipe has no mode for "
                         "(dynamic loss scaling is not wired in): remove the fp16 section and pass --dtype bf16 "
                         "or fp32")
    if cfg.dtype == "bf16":
        if stage == 0 and cfg.optimizer != "adamw":
            raise ValueError(f"Invalid --dtype bf16 at ZeRO stage 0 with --optimizer {cfg.optimizer}: DeepSpeed's "
                             "bf16 optimizer hands it flat fp32 copies of the weights, which cannot be projected; "
                             "use --zero 1, 2 or 3, or --dtype fp32")
        config = {**config, "bf16": {**(config.get("bf16") or {}), "enabled": True}}
    if cfg.optimizer != "adamw":
        check_sharding(cfg, config)
    return with_batch_sizes(config, cfg.batch_size, world_size)


def _enabled(config: dict, section: str) -> bool:
    value = config.get(section)
    return bool(value.get("enabled")) if isinstance(value, dict) else False


def check_sharding(cfg: argparse.Namespace, config: dict) -> None:
    """Run :func:`slimtrain.sharding.api.check_config`, which ``sharding.initialize`` runs on every rank, here
    and now: on the optimizer built over the model on the meta device (shapes only, no memory)."""
    from slimtrain.sharding.api import check_config

    with torch.device("meta"):
        _, optimizer = build_model_and_optimizer(cfg, place=False)
    try:
        check_config(config, optimizer)
    except ValueError as e:
        where = cfg.ds_config if cfg.ds_config is not None else f"zero{cfg.zero}.json"
        raise ValueError(f"Invalid --ds-config: {where}: {e}") from None


def shipped_config(stage: int) -> dict:
    """The config ``slimtrain/recipes/ds_configs/zero{stage}.json`` shipped with the package."""
    return json.loads((resources.files(__package__) / "ds_configs" / f"zero{stage}.json").read_text())


def load_config(path: str) -> dict:
    """A user's DeepSpeed JSON config, refused if it would override what the recipe sets."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Invalid --ds-config: file not found: {path}")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Invalid --ds-config: {path} is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"Invalid --ds-config: {path} holds a {type(config).__name__} (expected a JSON object)")
    for section, owner in (("optimizer", "--optimizer, --lr"), ("scheduler", "--warmup, --steps")):
        if section in config:
            raise ValueError(f"Invalid --ds-config: {path} sets '{section}', which the recipe builds from {owner}: "
                             "remove the section")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"Invalid --ds-config: zero_optimization is {zero!r} in {path} "
                         "(expected an object such as {\"stage\": 2}, or no key for stage 0)")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"Invalid --ds-config: zero_optimization.stage is {stage!r} in {path} (expected 0, 1, 2 or 3)")
    return config


def check_checkpoint(where: str) -> None:
    """Refuse a DeepSpeed checkpoint directory ``--resume`` cannot load: no tag in ``latest``, no such
    tag, or an empty or truncated file in it (``ValueError`` naming the path)."""
    with open(os.path.join(where, "latest")) as f:
        tag = f.read().strip()
    tag_dir = os.path.join(where, tag)
    if not tag or not os.path.isdir(tag_dir) or os.path.dirname(os.path.normpath(tag_dir)) != os.path.normpath(where):
        raise ValueError(f"Invalid --resume: {os.path.join(where, 'latest')} names {tag!r}, which is not a "
                         f"checkpoint directory in {where}")
    files = sorted(n for n in os.listdir(tag_dir) if n.endswith(".pt"))
    if not files:
        raise ValueError(f"Invalid --resume: {tag_dir} holds no checkpoint files")
    for name in files:
        outputs.check_checkpoint_file(os.path.join(tag_dir, name))


def with_batch_sizes(config: dict, batch_size: int, world_size: int) -> dict:
    """``config`` with its batch keys set from the global ``--batch-size``; ``ValueError`` where they disagree.

    ``"auto"`` (or an absent key) is filled in; gradient accumulation defaults to 1.
    """
    accum = config.get("gradient_accumulation_steps", "auto")
    accum = 1 if accum == "auto" else accum
    if not (isinstance(accum, int) and accum >= 1):
        raise ValueError(f"Invalid --ds-config: gradient_accumulation_steps is {accum!r} "
                         "(expected an integer >= 1 or \"auto\")")
    if batch_size % (world_size * accum):
        raise ValueError(f"Invalid --batch-size: {batch_size} (expected a multiple of {world_size} ranks x "
                         f"{accum} accumulation steps = {world_size * accum})")
    wanted = dict(zip(BATCH_KEYS, (batch_size, batch_size // (world_size * accum), accum)))
    for key, value in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"Invalid --ds-config: {key} is {config[key]!r}, but --batch-size {batch_size} on "
                             f"{world_size} ranks needs {value} (or \"auto\")")
    return {**config, **wanted}
