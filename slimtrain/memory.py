"""How much memory training takes: weights, gradients and optimizer state, per model component.

    slimtrain memory 7B --optimizer galore --rank 1024 --state-bits 8
    slimtrain memory path/to/config.json --optimizer adamw

Built the way the GaLore paper's memory tables are (Zhao et al. 2024, Table 2 and Fig. 1): count the
tensors each part of the model holds and multiply by their element size, no allocator, activations
or framework overhead. The model is built on the meta device (no memory), so any transformers
causal-LM config works, and the optimizer state is counted by the same rules the optimizers follow
when they create it: :func:`estimate_memory` on a model equals ``optimizer.state_bytes()`` after its
first step, byte for byte (``tests/test_memory.py``). This module is the command and the function; what
is counted, and how, is :mod:`slimtrain.memory_estimate`.

Built-in shapes are the LLaMA configs of the GaLore paper (vocabulary 32000, untied head):
60M, 130M, 350M, 1B and 7B, read from :mod:`slimtrain.models` (whose names this module re-exports).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

import torch

# Component, MemoryEstimate and MemoryOptions: what estimate_memory takes and returns, importable from here too.
from .memory_estimate import (  # noqa: F401
    DTYPES,
    Component,
    MemoryEstimate,
    MemoryOptions,
    count_memory,
    optimizer_names,
    resolve_method,
)
from .models import LLAMA_SHAPES, LLAMA_VOCAB, llama_config, llama_from_shape, load_config, meta_model  # noqa: F401
from .optimizers._validation import STATE_BITS
from .optimizers.projectors import PROJECTORS
from .optimizers.projectors.base import BASIS_DTYPES

# The ranks of the GaLore paper's runs for each size (Table 2; 7B: Table 3).
PAPER_RANKS = {"60M": 128, "130M": 256, "350M": 256, "1B": 512, "7B": 1024}




# ----------------------------------------------------------------------------------------------
# The estimate


def estimate_memory(
    config_or_name,
    optimizer: str = "galore",
    options: MemoryOptions | None = None,
    *,
    model: torch.nn.Module | None = None,
    **settings,
) -> MemoryEstimate:
    """Weights, gradients and optimizer state per component of a causal LM, in bytes.

    Args:
        config_or_name: ``"60M"``, ``"130M"``, ``"350M"``, ``"1B"``, ``"7B"`` (GaLore's LLaMA shapes), a
            ``config.json`` path or folder, or a transformers config.
        optimizer: ``"adamw"`` (slimtrain's AdamW: every parameter dense) or a registered method
            (``"galore"``, ``"fira"``, ``"frugal"``, ``"dct"``, ``"sst"``, ...); a ``"...8bit"`` name sets
            ``state_bits=8``.
        options: what is counted (:class:`~slimtrain.memory_estimate.MemoryOptions`), or its fields as
            keywords (``rank=1024, state_bits=8, weight_dtype="bf16", layerwise=True, ...``); any other keyword is
            an option of the method (FRUGAL's ``density=0.25``, ``mode="block"``), given to its constructor.
        model: count this model's parameters instead of building ``config_or_name`` on the meta device.

    Raises:
        ValueError: a model, an optimizer or an option the optimizers refuse, with their own message.
    """
    if options is not None and settings:
        raise TypeError("estimate_memory takes options or keyword settings, not both")
    options = MemoryOptions.from_settings(**settings) if options is None else options
    method, eight_bit = resolve_method(optimizer)
    if eight_bit:
        options = dataclasses.replace(options, state_bits=8)
    name = config_or_name if isinstance(config_or_name, str) else type(config_or_name).__name__
    size = name.upper() if isinstance(name, str) and name.upper() in LLAMA_SHAPES else None
    if options.rank is None:
        options = dataclasses.replace(options, rank=PAPER_RANKS.get(size, 128))
    if model is None:
        model = meta_model(load_config(config_or_name))
    return count_memory(str(name), model, method, options)


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("model", help=f"a built-in LLaMA size ({', '.join(LLAMA_SHAPES)}) or a config.json path")
    a("--optimizer", default="galore", help=f"{', '.join(optimizer_names())} (default: galore)")
    a("--rank", type=int, default=None, help="projection rank (default: the GaLore paper's for the size, else 128)")
    a("--state-bits", type=int, default=32, choices=STATE_BITS, help="optimizer state width (default: 32)")
    a("--weight-dtype", default="bf16", choices=tuple(DTYPES), help="weights and gradients (default: bf16)")
    a("--target-modules", default="all-linear",
      help="'all-linear' (default) or comma-separated substrings of module names, e.g. self_attn,mlp")
    a("--projector", default=None, choices=tuple(PROJECTORS), help="projector (default: the method's)")
    a("--density", type=float, default=None, help="FRUGAL's state-full fraction (default: the method's, 0.25)")
    a("--mode", "--frugal-mode", dest="mode", default=None,
      help="the method's mode, FRUGAL's subspace or block (default: the method's)")
    a("--min-8bit-size", type=int, default=4096, help="smaller moments stay fp32 (default: 4096)")
    a("--block-size", type=int, default=256, help="8-bit quantization block (default: 256)")
    a("--stochastic-round", action="store_true", help="count bf16 stochastic rounding's per-parameter seed")
    a("--layerwise", action="store_true", help="layer-wise updates: one gradient alive at a time")
    a("--basis-dtype", default="fp32", choices=tuple(BASIS_DTYPES),
      help="how the svd/randomized projectors store their basis (default: fp32)")
    a("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run_cli(args: argparse.Namespace) -> MemoryEstimate:
    """Estimate and print; bad input is one line on stderr naming the option, exit status 2."""
    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    method_options = {k: getattr(args, k) for k in ("density", "mode") if getattr(args, k) is not None}
    options = MemoryOptions(
        rank=args.rank, state_bits=args.state_bits, weight_dtype=args.weight_dtype, target_modules=targets,
        projector=args.projector, min_8bit_size=args.min_8bit_size, block_size=args.block_size,
        bf16_stochastic_round=args.stochastic_round, layerwise=args.layerwise, basis_dtype=args.basis_dtype,
        method_options=method_options,
    )
    try:
        est = estimate_memory(args.model, args.optimizer, options)
    except (ValueError, OSError) as e:
        print(f"error: {_as_option(str(e), set(vars(args)) - {'model'})}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(est.as_dict(), indent=2) if args.json else est.table())
    return est


def _as_option(message: str, options: set[str]) -> str:
    """``Invalid block_size: 7 ...`` (the optimizers' wording) as ``Invalid --block-size: 7 ...``."""
    name = re.match(r"Invalid (\w+):", message)
    if name is None or name[1] not in options:
        return message
    return f"Invalid --{name[1].replace('_', '-')}:{message[name.end():]}"


def main(argv: list[str] | None = None) -> MemoryEstimate:
    """``slimtrain memory ...`` (also ``python -m slimtrain.memory ...``)."""
    parser = argparse.ArgumentParser(prog="slimtrain memory", description="Training memory per model component.")
    return run_cli(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    main()
