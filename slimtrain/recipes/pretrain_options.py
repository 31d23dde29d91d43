"""What a run of the pretrain recipes is: their options, and the checks of a run's arguments in one pass.

:func:`add_arguments` defines the options of ``slimtrain pretrain`` (and, with the DeepSpeed config's,
of ``slimtrain deepspeed``); :func:`validate` checks them all before anything heavy, in this order: the
numbers and their combinations, the device and dtype, the model (``--rank`` against its matrices), the
data files, and ``--out`` (:func:`check_out`: an empty directory for a new run; for ``--resume`` the
checkpoint, the same recorded arguments, the log and the data's fingerprint). The driver,
:mod:`slimtrain.recipes.pretrain`, runs :func:`check_out` once more under the lock on ``--out``.
Every refusal is a ``ValueError`` or ``FileNotFoundError`` naming the option, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os

from . import metrics, outputs, runtime
from .data import VOCAB_SIZE, check_files, fingerprint
from .models import MODEL_SHAPES, model_config, smallest_matrix_dim
from .optim import check_optimizer_name, defaults, recipe_names, recipe_rank
from .shakespeare import shakespeare_files

DESCRIPTION = "Pre-train a small LLaMA on Shakespeare (or your own text files) with any slimtrain optimizer."
CHECKPOINT = "checkpoint.pt"
# Arguments that may differ between a run and its resumption without changing the result.
_RUN_CONTROL = ("resume", "overwrite", "allow_data_change", "stop_at", "out", "progress", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The recipe's options, on ``parser`` (shared by ``python -m`` and ``slimtrain pretrain``)."""
    add = parser.add_argument
    add("--model", default="tiny", help=f"model shape: {', '.join(MODEL_SHAPES)} (default: tiny, 1.9M parameters)")
    add("--optimizer", default="galore", help=f"{', '.join(recipe_names())} (default: galore)")
    add("--lr", type=float, default=None, help="peak learning rate (default: the method's, e.g. 0.01 GaLore, 1e-3 AdamW)")
    add("--rank", type=int, default=None, help="projection rank (default: a quarter of the smallest matrix dimension)")
    add("--update-proj-gap", type=int, default=None, help="steps between subspace refreshes (default: 200)")
    add("--scale", type=float, default=None, help="low-rank update scale alpha (default: 0.25 GaLore/Fira/DCT)")
    add("--density", type=float, default=None, help="FRUGAL's state-full fraction (default: 0.25)")
    add("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default: 0)")
    add("--steps", type=int, default=500, help="optimizer steps (default: 500)")
    add("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    add("--seq-len", type=int, default=128, help="tokens (bytes) per sequence (default: 128)")
    add("--warmup", type=int, default=None, help="linear warm-up steps, then cosine to 10%% (default: steps/10)")
    add("--eval-every", type=int, default=100, help="steps between validation passes (default: 100)")
    add("--eval-batches", type=int, default=16, help="validation batches per pass (default: 16)")
    add("--seed", type=int, default=0, help="seed for weights and batch order (default: 0)")
    add("--device", default="auto", help=f"{runtime.DEVICES_HELP} (default: auto)")
    add("--dtype", default="fp32",
        help="fp32; bf16 (bf16 weights and gradients, the optimizer's state and math in fp32, as the GaLore "
             "paper's script casts the model); bf16-autocast (fp32 weights, bf16 autocast forward) (default: fp32)")
    add("--activation-checkpointing", action="store_true",
        help="recompute each transformer block's activations in the backward pass instead of keeping them")
    add("--data", nargs="+", default=None, metavar="FILE",
        help="text files, one document each, split into train/validation by file (default: Shakespeare)")
    add("--out", required=True, help="output directory (must be new or empty unless --resume/--overwrite)")
    add("--resume", action="store_true", help="continue from the checkpoint in OUT, with the same arguments and data")
    add("--allow-data-change", action="store_true",
        help="with --resume: continue although a data file changed since the run started (refused otherwise: "
             "the result is then no longer the uninterrupted run's); the new contents' SHA-256 is recorded")
    add("--overwrite", action="store_true",
        help="replace the outputs of an earlier slimtrain run in OUT (only the files its marker names)")
    add("--stop-at", type=int, default=None, metavar="STEP",
        help="stop after STEP steps (checkpointing there) without changing the schedule; continue with --resume")
    runtime.add_process_options(add)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser(prog="python -m slimtrain.recipes.pretrain", description=DESCRIPTION)).parse_args(argv)


def validate(
    cfg: argparse.Namespace,
    allowed_optimizers: tuple[str, ...] | None = None,
    checkpoint: str = CHECKPOINT,
    resolve_device: bool = True,
) -> argparse.Namespace:
    """Check every argument before anything heavy; raise ``ValueError``/``FileNotFoundError`` naming it.

    In order: the numbers and their combinations, the device and dtype, the model (``--rank`` against its
    matrices), the data files, ``--out`` (:func:`check_out`). Fills in ``cfg.rank``, ``cfg.data`` (the
    Shakespeare files by default) and ``cfg.device`` (``auto`` resolved to ``cuda`` or ``cpu``). Builds a
    config, not a model, and reads the data files only to fingerprint them for ``--resume``.
    ``allowed_optimizers`` lets the benchmarks add the reference implementations, which the command line
    does not offer; ``checkpoint`` is the file under ``--out`` that ``--resume`` needs (the DeepSpeed
    recipe keeps a directory and its ``latest`` file instead, and places ranks itself: ``resolve_device=False``).
    """
    _check_numbers(cfg, allowed_optimizers)
    if resolve_device:
        cfg.device = runtime.resolve_device(cfg.device)
        runtime.check_dtype(cfg.dtype, cfg.device)
    config = model_config(cfg.model, VOCAB_SIZE, cfg.seq_len)
    if cfg.optimizer != "adamw":
        limit = smallest_matrix_dim(config)
        cfg.rank = recipe_rank(cfg.optimizer, limit, cfg.rank)
        if not 1 <= cfg.rank <= limit:
            raise ValueError(f"Invalid --rank: {cfg.rank} (expected 1 <= rank <= {limit}, the smallest dimension of "
                             f"the {cfg.model} model's attention/MLP matrices)")
    cfg.data = shakespeare_files() if cfg.data is None else check_files(cfg.data)
    if cfg.out is not None:
        check_out(cfg, checkpoint, fingerprint(cfg.data) if cfg.resume else {})
    return cfg


def _check_numbers(cfg: argparse.Namespace, allowed_optimizers: tuple[str, ...]) -> None:
    check_optimizer_name(cfg.optimizer, allowed_optimizers)
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"Invalid --{name.replace('_', '-')}: {getattr(cfg, name)} (expected an integer >= 1)")
    for name in ("lr", "scale"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"Invalid --{name}: {value} (expected a number > 0)")
    with_density = [name for name, hp in defaults().items() if "density" in hp]
    if cfg.density is not None and not (cfg.optimizer in with_density and 0.0 <= cfg.density <= 1.0):
        raise ValueError(f"Invalid --density: {cfg.density} (expected 0 <= density <= 1, with --optimizer "
                         f"{' or '.join(with_density)} only)")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"Invalid --weight-decay: {cfg.weight_decay} (expected a number >= 0)")
    if cfg.optimizer == "adamw" and (cfg.rank, cfg.update_proj_gap, cfg.scale) != (None, None, None):
        raise ValueError("Invalid --rank/--update-proj-gap/--scale with --optimizer adamw (AdamW has no projection)")
    if cfg.optimizer == "spectral-sst" and cfg.scale is not None:
        raise ValueError(f"Invalid --scale: {cfg.scale} with --optimizer spectral-sst (SpectralSSTAdamW has no update scale)")
    if cfg.warmup is not None and not 0 <= cfg.warmup < cfg.steps:
        raise ValueError(f"Invalid --warmup: {cfg.warmup} (expected 0 <= warmup < steps = {cfg.steps})")
    if cfg.stop_at is not None and not 1 <= cfg.stop_at <= cfg.steps:
        raise ValueError(f"Invalid --stop-at: {cfg.stop_at} (expected 1 <= stop-at <= steps = {cfg.steps})")
    if cfg.update_proj_gap is not None and cfg.update_proj_gap < 1:
        raise ValueError(f"Invalid --update-proj-gap: {cfg.update_proj_gap} (expected an integer >= 1)")
    if cfg.resume and cfg.overwrite:
        raise ValueError("Invalid --resume with --overwrite: pick one (continue the run in --out, or replace it)")
    if cfg.allow_data_change and not cfg.resume:
        raise ValueError("Invalid --allow-data-change without --resume (it lets a resumed run go on with changed data)")


def check_out(cfg: argparse.Namespace, checkpoint: str, sha256: dict[str, str]) -> None:
    """The ``--out`` checks, run by :func:`validate` and again under the run's lock (:func:`own_out`).

    A new run needs an empty ``--out`` (or one ``--overwrite`` may clear); a resumed one its checkpoint,
    its recorded arguments (equal to ``cfg``'s but for :data:`_RUN_CONTROL`), its log, and data files
    whose SHA-256 (``sha256``) is the one recorded.
    """
    outputs.check_out_writable(cfg.out)
    if not cfg.resume:
        outputs.check_new(cfg.out, cfg.overwrite, resumable=True)
        return
    ckpt = os.path.join(cfg.out, checkpoint)
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"Invalid --resume: no checkpoint at {ckpt}")
    if checkpoint == CHECKPOINT:  # the DeepSpeed recipe checks its checkpoint directory itself
        outputs.check_checkpoint_file(ckpt)
    # A run recorded without --device ran on the CPU, or (DeepSpeed, cfg.device "auto") where DeepSpeed put it.
    legacy = {**runtime.LEGACY_DEFAULTS, "device": "auto" if cfg.device == "auto" else "cpu"}
    saved = {**legacy, **outputs.read_config(cfg.out)}
    mismatched = {k: (saved.get(k), v) for k, v in run_args(cfg).items() if saved.get(k) != v}
    if "device" in mismatched and runtime.same_device_kind(*map(str, mismatched["device"])):
        del mismatched["device"]  # another GPU of the machine: same kernels, same results
    if cfg.allow_data_change:
        mismatched.pop("data", None)
    if mismatched:
        diff = ", ".join(f"--{k.replace('_', '-')} {new!r} (was {old!r})" for k, (old, new) in mismatched.items())
        raise ValueError(f"Invalid --resume: arguments differ from the run in {cfg.out}: {diff}")
    metrics.check_log(cfg.out)
    outputs.check_fingerprint(saved, sha256, cfg.allow_data_change)


def own_out(cfg: argparse.Namespace, checkpoint: str, sha256: dict[str, str]):
    """The lock on ``--out`` for this run (a no-op without one), with :func:`check_out` repeated under it
    on ``sha256``, the fingerprint of the data as the run read it."""
    if cfg.out is None:
        return contextlib.nullcontext()
    return outputs.own(cfg.out, lambda: check_out(cfg, checkpoint, sha256))


def run_args(cfg: argparse.Namespace) -> dict:
    """The arguments ``config.json`` records, and a resume must repeat."""
    return {k: v for k, v in vars(cfg).items() if k not in _RUN_CONTROL}
