"""What a run of the fsdp recipe is: the pretrain recipe's options, how parameters are sharded, their checks.

:func:`validate` checks a run's arguments in one pass, as the pretrain recipe does (its checks, with the
checkpoint a resumed run needs being ``OUT/checkpoint/latest``), and the recipe's own: a device kind each rank
can take (``auto``, ``cpu`` or ``cuda``), ``bf16`` as FSDP2's mixed precision, a global ``--batch-size`` the
ranks divide, and an optimizer whose run the recipe can checkpoint and resume. It runs in ``slimtrain fsdp`` before the launch and
again in every rank; each refusal is a ``ValueError`` or ``FileNotFoundError`` naming the option.
"""

from __future__ import annotations

import argparse
import os

import torch

from . import outputs, pretrain_options, runtime

DESCRIPTION = "The pretrain recipe under FSDP2 (torch's fully_shard): same model, data, optimizers and outputs, on N ranks."
MODULE = "slimtrain.recipes.fsdp"
CHECKPOINT_DIR = "checkpoint"
LATEST = os.path.join(CHECKPOINT_DIR, "latest")  # names the newest checkpoint directory: what --resume needs
RECIPE_STATE = "recipe.pt"  # in each checkpoint directory: the schedule, the RNG and the step
PLACEMENTS = ("low-rank", "rows")
DEVICES = ("auto", "cpu", "cuda")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """What each rank parses: the pretrain recipe's options and how parameters are sharded."""
    pretrain_options.add_arguments(parser)
    parser.add_argument("--placement", default="low-rank", choices=PLACEMENTS,
                        help="low-rank: matrices projected by rows are sharded by columns, so every projection is "
                             "local (slimtrain.sharding.low_rank_placement); rows: FSDP2's default (default: low-rank)")
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``slimtrain fsdp``: the recipe's options, and how many ranks to launch."""
    add_recipe_arguments(parser)
    parser.add_argument("--ranks", type=int, default=2, help="processes to launch: GPUs, or CPU ranks (default: 2)")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command without running it")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"torchrun --nproc_per_node N -m {MODULE}", description=DESCRIPTION)
    return add_recipe_arguments(parser).parse_args(argv)


def validate(cfg: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Check every argument, as the pretrain recipe does, before anything heavy (``ValueError`` or
    ``FileNotFoundError`` naming it). ``--device auto`` becomes the kind the ranks run on (``cuda`` or ``cpu``)."""
    if cfg.device not in DEVICES:
        raise ValueError(f"Invalid --device: {cfg.device!r} with the fsdp recipe (expected one of "
                         f"{', '.join(DEVICES)}: each rank takes the GPU of its local rank, or the CPU)")
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and torch.cuda.device_count() < 1:
        raise ValueError("Invalid --device: 'cuda' (torch sees no GPU on this machine)")
    runtime.check_dtype(cfg.dtype, cfg.device)
    if cfg.dtype == "bf16-autocast":
        raise ValueError("Invalid --dtype: 'bf16-autocast' with the fsdp recipe (FSDP2's mixed precision already keeps "
                         "fp32 sharded weights of a bf16 forward); use --dtype bf16")
    if cfg.batch_size % world_size:
        raise ValueError(f"Invalid --batch-size: {cfg.batch_size} (expected a multiple of the {world_size} ranks)")
    if cfg.optimizer == "spectral-sst":
        raise ValueError("Invalid --optimizer spectral-sst with the fsdp recipe: SpectralSSTAdamW steps the factors of "
                         "to_spectral's layers, which are not FSDP2 matrices; run it with slimtrain pretrain")
    if cfg.optimizer.startswith("frugal-block"):
        raise ValueError(f"Invalid --optimizer {cfg.optimizer} with the fsdp recipe: FRUGAL's block mode keeps moments "
                         "only for the current window's matrices, and torch.distributed.checkpoint loads into a fresh "
                         "optimizer laid out as the first window, so the recipe's checkpoints could not be resumed; "
                         "use --optimizer frugal (FrugalAdamW(mode='block') itself runs under FSDP2)")
    pretrain_options.validate(cfg, checkpoint=LATEST, resolve_device=False)
    if cfg.resume:
        checkpoint_path(cfg.out)
    return cfg


def checkpoint_path(out: str) -> str:
    """The checkpoint directory ``OUT/checkpoint/latest`` names (``ValueError`` if it names none)."""
    where = os.path.join(out, CHECKPOINT_DIR)
    with open(os.path.join(out, LATEST)) as f:
        tag = f.read().strip()
    path = os.path.join(where, tag)
    if not tag or os.sep in tag or not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"Invalid --resume: {os.path.join(out, LATEST)} names {tag!r}, which is not a checkpoint "
                         f"directory in {where}")
    outputs.check_checkpoint_file(os.path.join(path, RECIPE_STATE))
    return path
