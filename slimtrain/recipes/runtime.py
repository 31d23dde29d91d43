"""Where and in what precision a recipe runs: ``--device``, ``--dtype``, peak memory, the process options, and how
the launcher subcommands (``slimtrain deepspeed``, ``slimtrain fsdp``) check and start their ranks.

Shared by every recipe so the options mean the same everywhere.

``--dtype`` (:data:`DTYPES`):

- ``fp32``: weights, activations, gradients and optimizer math in fp32 (the default; bit-exact resume).
- ``bf16``: the model is cast to bf16 after its seeded fp32 initialisation, so weights, activations and
  gradients are bf16. This is how the GaLore paper's runs train (galore-torch's ``torchrun_main.py``, default
  ``--dtype bfloat16``: ``model.to(device=device, dtype=torch.bfloat16)``, no autocast, no master weights;
  galore-torch's optimizers then keep bf16 state, ours keep fp32). slimtrain's
  optimizers keep their state in fp32 and compute the update in fp32, then round it to nearest into the
  bf16 weight; torch AdamW (``--optimizer adamw``) keeps bf16 state, as in galore-torch's AdamW
  baseline. Half the weight and gradient memory of fp32, but updates below bf16's spacing (2^-8
  relative) are lost to rounding.
- ``bf16-autocast``: fp32 weights (the "master" copy the optimizer updates), forward passes under
  ``torch.autocast(dtype=torch.bfloat16)``: matmuls run in bf16, gradients arrive in fp32. The usual
  mixed precision: no update is lost to rounding, but weights and gradients cost what fp32 does.

The cross-entropy is computed on fp32 logits in every mode.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import resource
import shlex
import subprocess
import sys
from collections.abc import Callable

import torch

DEVICES_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"
DTYPES = ("fp32", "bf16", "bf16-autocast")
# What a run whose config.json lacks these options was made with: it resumes with them.
LEGACY_DEFAULTS = {"device": "cpu", "dtype": "fp32", "activation_checkpointing": False}


def resolve_device(name: str) -> str:
    """``--device`` as a torch device string: ``auto`` becomes ``cuda`` or ``cpu``.

    Raises ``ValueError`` naming the value for an unknown device or one this machine lacks.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    index = name[len("cuda:"):] if name.startswith("cuda:") else None
    if name != "cuda" and not (index is not None and index.isdigit()):
        raise ValueError(f"Invalid --device: {name!r} (expected {DEVICES_HELP})")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"Invalid --device: {name!r} (no CUDA device available: {why}; use --device cpu)")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ValueError(f"Invalid --device: {name!r} (this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1})")
    return name


def check_dtype(dtype: str, device: str) -> None:
    """Refuse a ``--dtype`` that is unknown or that ``device`` cannot run (``ValueError`` naming both)."""
    if dtype not in DTYPES:
        raise ValueError(f"Invalid --dtype: {dtype!r} (expected one of {', '.join(DTYPES)})")
    if dtype != "fp32" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ValueError(f"Invalid --dtype: {dtype!r} on {device} ({torch.cuda.get_device_name(device)} has no "
                         "bf16 support; use --dtype fp32)")


def same_device_kind(a: str, b: str) -> bool:
    """Whether a run recorded on ``a`` may resume on ``b``: the same kind (cpu, cuda); the GPU index may
    differ. ``auto`` (the DeepSpeed recipe's, unresolved) is only the same as itself."""
    if "auto" in (a, b):
        return a == b
    return torch.device(a).type == torch.device(b).type


def autocast(device: str, dtype: str):
    """The context a forward pass runs in: bf16 autocast for ``bf16-autocast``, nothing otherwise."""
    if dtype == "bf16-autocast":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def weight_dtype(dtype: str) -> torch.dtype:
    """The dtype of the model's weights for a ``--dtype``."""
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def enable_activation_checkpointing(model) -> None:
    """Recompute each transformer block's activations in the backward pass (a Hugging Face model's own
    checkpointing: ``torch.utils.checkpoint`` around every layer, non-reentrant as torch recommends).

    Gradients equal those without it: measured bit for bit on the tiny LLaMA on the CPU, in fp32, bf16
    and bf16 autocast (``tests/recipes/test_pretrain.py``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def reset_peak_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: str) -> tuple[int, str]:
    """(bytes, what they measure): on CUDA ``torch.cuda.max_memory_allocated`` since the run (or resume)
    started (tensors only: weights, gradients, optimizer state, activations); on the CPU the process's
    peak resident set size (``ru_maxrss``: everything the process holds, Python and torch included, since
    it started), which is an upper bound and not comparable with the CUDA number."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024, "cpu_peak_rss"


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so a step's wall time is its own (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def package_version(dist: str) -> str:
    """An installed distribution's version, or ``"not installed"`` (for the environment line of a results file)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def changed_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The options of ``parser`` whose values in ``args`` differ from their defaults, as a command line (what a
    launcher command passes on to each rank)."""
    argv = []
    for action in parser._actions:
        value = getattr(args, action.dest, action.default)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # store_true / store_false
            argv.append(flag)
        else:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    return argv


def recipe_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` as each rank of a launcher subcommand will parse them: only the recipe ``parser``'s options, without
    the launcher's own (``--ranks``, ``--dry-run``, ...), which are not the run's and which ``--resume`` must not
    compare with the saved run's."""
    return argparse.Namespace(**{a.dest: getattr(args, a.dest) for a in parser._actions
                                 if a.dest != "help" and hasattr(args, a.dest)})


def add_process_options(add: Callable) -> None:
    """``--threads`` and ``--no-progress`` (``add`` is a parser's ``add_argument``): how a recipe's process runs,
    the same in every recipe."""
    add("--threads", type=int, default=1,
        help="CPU threads (default: 1; more threads than free cores slow a run down)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def check_and_launch(checks: Callable[[], None], out: str, dry_run: bool, command: list[str]) -> None:
    """What a launcher subcommand (``slimtrain deepspeed``, ``slimtrain fsdp``) does with parsed arguments: run
    ``checks`` and, unless ``dry_run``, make sure no other run holds ``out`` (rank 0 takes it for the run), each
    refusal one line and exit status 2; then print ``command`` and, unless ``dry_run``, run it and exit with its
    status."""
    from . import outputs

    try:
        checks()
        if not dry_run:
            with outputs.own(out):
                pass
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(shlex.join(command), flush=True)
    if dry_run:
        return
    raise SystemExit(subprocess.call(command))
