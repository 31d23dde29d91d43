"""How much memory training takes: weights, gradients and optimizer state, per model component.

    slimtrain memory 7B --optimizer galore --rank 1024 --state-bits 8
    slimtrain memory path/to/config.json --optimizer adamw

Built the way the GaLore paper's memory tables are (Zhao et al. 2024, Table 2 and Fig. 1): count the
tensors each part of the model holds and multiply by their element size, no allocator, activations
or framework overhead. The model is built on the meta device (no memory), so any transformers
causal-LM config works, and the optimizer state is counted by the same rules the optimizers follow
when they create it: :func:`estimate_memory` on a model equals ``optimizer.state_bytes()`` after its
first step, byte for byte (``tests/test_memory.py``).

Built-in shapes are the LLaMA configs of the GaLore paper (vocabulary 32000, untied head):
60M, 130M, 350M, 1B and 7B, read from :mod:`slimtrain.models` (whose names this module re-exports).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field

import torch

from .models import LLAMA_SHAPES, LLAMA_VOCAB, llama_config, llama_from_shape, load_config, meta_model  # noqa: F401
from .optimizers import _validation as V
from .optimizers import quantized as Q
from .optimizers.base import LowRankAdamW
from .optimizers.groups import low_rank_param_groups
from .optimizers.projectors import PROJECTORS as PROJECTOR_CLASSES
from .optimizers.projectors.base import BASIS_DTYPES
from .optimizers.rule import matrix_shape
from .optimizers.state import ABSMAX_SUFFIX, ROUNDING, Slot

# The ranks of the GaLore paper's runs for each size (Table 2; 7B: Table 3).
PAPER_RANKS = {"60M": 128, "130M": 256, "350M": 256, "1B": 512, "7B": 1024}

OPTIMIZERS = ("adamw", "galore", "fira", "frugal", "dct", "sst")
PROJECTORS = ("svd", "randomized", "dct", "random", "columns")
BASIS_PROJECTORS = ("svd", "randomized")  # the projectors that store an r x n float basis
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head", "other")


@dataclass
class Component:
    """Bytes held for one part of the model. ``state`` splits into what it is made of."""

    name: str
    params: int = 0
    weights: int = 0
    grads: int = 0
    moments: int = 0  # Adam's exp_avg/exp_avg_sq: fp32 values or uint8 codes
    absmax: int = 0  # fp32 scale per quantization block of 8-bit moments
    projector: int = 0  # basis, indices (SST: the singular factors)
    counters: int = 0  # step counts, seeds, scalars

    @property
    def state(self) -> int:
        return self.moments + self.absmax + self.projector + self.counters

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.state

    def add(self, other: Component) -> None:
        for k in ("params", "weights", "grads", "moments", "absmax", "projector", "counters"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class MemoryEstimate:
    """The result of :func:`estimate_memory`: one :class:`Component` per model part, and the setting."""

    model: str
    setting: str
    components: list[Component]
    assumptions: list[str] = field(default_factory=list)

    @property
    def total(self) -> Component:
        out = Component("total")
        for c in self.components:
            out.add(c)
        return out

    def table(self, unit: float = 1e9, unit_name: str = "GB") -> str:
        """A plain-text table in ``unit_name`` (default GB = 10^9 bytes), then the assumptions."""
        cols = ("params", "weights", "grads", "moments", "absmax", "projector", "counters", "state", "total")
        head = f"{'component':<12}{'params':>10}" + "".join(f"{c:>11}" for c in cols[1:])
        lines = [f"{self.model}: {self.setting} (bytes in {unit_name})", head, "-" * len(head)]
        for c in [*self.components, self.total]:
            if c.name == "total":
                lines.append("-" * len(head))
            row = f"{c.name:<12}{_count(c.params):>10}"
            row += "".join(f"{getattr(c, k) / unit:>11.4f}" for k in cols[1:])
            lines.append(row)
        lines.append("")
        lines.append("Assumptions:")
        lines += [f"- {a}" for a in self.assumptions]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        keys = ("params", "weights", "grads", "moments", "absmax", "projector", "counters", "state", "total")
        return {
            "model": self.model,
            "setting": self.setting,
            "components": {c.name: {k: getattr(c, k) for k in keys} for c in [*self.components, self.total]},
            "assumptions": self.assumptions,
        }


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def component_of(name: str) -> str:
    """Which table row a parameter belongs to, from its qualified name."""
    n = name.lower()
    if "lm_head" in n or n.startswith("output") or ".output." in n:
        return "head"
    if "embed" in n or "wte" in n or "wpe" in n:
        return "embeddings"
    if "norm" in n or n.endswith("ln_f.weight") or ".ln_" in n:
        return "norms"
    if "attn" in n or "attention" in n:
        return "attention"
    if "mlp" in n or "feed_forward" in n or "ffn" in n:
        return "mlp"
    return "other"


# ----------------------------------------------------------------------------------------------
# What each optimizer holds per parameter: its own declaration (slimtrain.optimizers.state)


def _category(slot: Slot) -> str:
    """The table column a state tensor is counted in."""
    if slot.key.endswith(ABSMAX_SUFFIX):
        return "absmax"
    if slot.key.startswith("exp_avg"):
        return "moments"
    if slot.key.startswith(("proj_", "sst_")) and not slot.host:
        return "projector"  # bases, indices, SST's factors
    return "counters"  # step counts, seeds, flags, Fira's limiter norm


def _build_optimizer(model: torch.nn.Module, s: dict, target_modules) -> LowRankAdamW:
    """The optimizer ``s`` describes, on ``model``'s parameters (nothing is allocated before a step). Built with
    fp32 states and then told its groups keep ``state_bits`` (the declaration reads only the groups), so an
    estimate of 8-bit states needs no bitsandbytes."""
    from .optimizers import OPTIMIZERS

    if s["optimizer"] == "adamw":  # slimtrain's dense path: no group is projected
        opt = LowRankAdamW(model.parameters(), min_8bit_size=s["min_8bit_size"], block_size=s["block_size"])
    else:
        kwargs = dict(min_8bit_size=s["min_8bit_size"], block_size=s["block_size"])
        if s["optimizer"] != "sst":
            projector = PROJECTOR_CLASSES[s["projector"]]
            stored = {"basis_dtype": s["basis_dtype"]} if s["projector"] in BASIS_PROJECTORS else {}
            kwargs["projector"] = projector(**stored)
        if s["optimizer"] == "frugal":
            kwargs.update(density=s["density"], mode=s["frugal_mode"])
        groups = low_rank_param_groups(model, target_modules, rank=s["rank"], proj_type=s["proj_type"])
        opt = OPTIMIZERS[s["optimizer"]](groups, **kwargs)
    for group in opt.param_groups:
        group["state_bits"] = s["state_bits"]
    return opt


def _param_state(opt: LowRankAdamW, p: torch.Tensor, group: dict, rounds: bool) -> Component:
    """The optimizer state ``p`` gets at its first step, from the optimizer's declaration. Stochastic rounding's
    slots follow the estimate's ``weight_dtype``, not ``p``'s (a meta model is built in fp32)."""
    slots = [slot for slot in opt.state_spec(p, group) if slot not in ROUNDING]
    projected = "rank" in group and matrix_shape(p) is not None
    if rounds and (not projected or opt.rule.stochastic_rounding):
        slots += ROUNDING
    c = Component("")
    for slot in slots:
        field_name = _category(slot)
        setattr(c, field_name, getattr(c, field_name) + slot.nbytes)
    return c


# ----------------------------------------------------------------------------------------------
# The estimate


def estimate_memory(
    config_or_name,
    optimizer: str = "galore",
    *,
    rank: int | None = None,
    state_bits: int = 32,
    weight_dtype: str = "bf16",
    target_modules: str | list[str] = "all-linear",
    projector: str | None = None,
    proj_type: str = "std",
    density: float | None = 0.25,
    frugal_mode: str = "subspace",
    min_8bit_size: int = 4096,
    block_size: int = 256,
    bf16_stochastic_round: bool = False,
    layerwise: bool = False,
    model: torch.nn.Module | None = None,
    basis_dtype: str = "fp32",
) -> MemoryEstimate:
    """Weights, gradients and optimizer state per component of a causal LM, in bytes.

    Args:
        config_or_name: ``"60M"``, ``"130M"``, ``"350M"``, ``"1B"``, ``"7B"`` (GaLore's LLaMA shapes), a
            ``config.json`` path or folder, or a transformers config.
        optimizer: ``"adamw"`` (slimtrain's AdamW: every parameter dense) or a low-rank method:
            ``"galore"``, ``"fira"``, ``"frugal"``, ``"dct"``, ``"sst"``; a ``"...8bit"`` name sets
            ``state_bits=8``.
        rank: the projection rank (default: the paper's for a built-in size, else 128).
        state_bits: 32 or 8 (moments of at least ``min_8bit_size`` elements in 8 bits).
        weight_dtype: ``"bf16"`` (default, as the paper), ``"fp16"`` or ``"fp32"``; gradients match.
        target_modules: which linear layers are projected (see :func:`low_rank_param_groups`).
        projector: the projector (default: the method's).
        proj_type, density, frugal_mode: as the optimizers' options (``frugal_mode`` ``"subspace"``
            or ``"block"``).
        min_8bit_size, block_size, bf16_stochastic_round: as the optimizers' options.
        basis_dtype: ``"fp32"`` or ``"bf16"``: how the ``svd`` and ``randomized`` projectors store their basis
            (their ``basis_dtype`` option).
        layerwise: gradients are stepped and freed one parameter at a time
            (:class:`~slimtrain.optimizers.LayerwiseStepper`), so only the largest is counted.
        model: count this model's parameters instead of building ``config_or_name`` on the meta device.
    """
    if isinstance(optimizer, str) and optimizer.endswith("8bit"):
        optimizer, state_bits = optimizer[: -len("8bit")], 8
    _check("optimizer", optimizer, OPTIMIZERS)
    _check("state_bits", state_bits, Q.STATE_BITS)
    _check("weight_dtype", weight_dtype, tuple(DTYPE_BYTES))
    _check("frugal_mode", frugal_mode, ("subspace", "block"))
    if projector is None and optimizer != "adamw":
        from .optimizers import OPTIMIZERS as CLASSES

        projector = CLASSES[optimizer].default_projector
    if optimizer not in ("adamw", "sst"):
        _check("projector", projector, PROJECTORS)
    _check("basis_dtype", basis_dtype, tuple(BASIS_DTYPES))
    if basis_dtype != "fp32" and (optimizer in ("adamw", "sst") or projector not in BASIS_PROJECTORS):
        raise ValueError(f"Invalid basis_dtype: {basis_dtype!r} (only the {' and '.join(BASIS_PROJECTORS)} projectors "
                         f"store a basis; {optimizer} with projector {projector!r} keeps none)")
    # The optimizers' own checks (what their constructors would refuse is not estimated).
    V.check_choice("proj_type", proj_type, V.PROJ_TYPES)
    V.check_int("min_8bit_size", min_8bit_size, minimum=0)
    V.check_int_choice("block_size", block_size, Q.BLOCK_SIZES)
    V.check_bool("bf16_stochastic_round", bf16_stochastic_round)
    if density is not None:
        V.check_unit_interval("density", density)
    elif optimizer == "frugal" and frugal_mode == "block":
        raise ValueError("Invalid density: None (block mode needs a density in [0, 1])")
    if rank is not None:
        V.check_int("rank", rank, minimum=1)
    name = config_or_name if isinstance(config_or_name, str) else type(config_or_name).__name__
    size = name.upper() if isinstance(name, str) and name.upper() in LLAMA_SHAPES else None
    if rank is None:
        rank = PAPER_RANKS.get(size, 128)
    if model is None:
        model = meta_model(load_config(config_or_name))
    s = dict(
        optimizer=optimizer, rank=rank, state_bits=state_bits, min_8bit_size=min_8bit_size,
        block_size=block_size, projector=projector, proj_type=proj_type, density=density, frugal_mode=frugal_mode,
        basis_dtype=basis_dtype,
    )
    opt = _build_optimizer(model, s, target_modules)  # refuses what the optimizer would (a rank too large, ...)
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    wbytes = DTYPE_BYTES[weight_dtype]
    rounds = bf16_stochastic_round and weight_dtype == "bf16"

    rows = {c: Component(c) for c in COMPONENTS}
    largest_grad, largest_row = 0, None
    seen: set[int] = set()
    for pname, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue  # tied weights are one tensor
        seen.add(id(p))
        row = rows[component_of(pname)]
        row.params += p.numel()
        row.weights += p.numel() * wbytes
        if p.numel() * wbytes > largest_grad:
            largest_grad, largest_row = p.numel() * wbytes, row
        if not layerwise:
            row.grads += p.numel() * wbytes
        row.add(_param_state(opt, p, groups[id(p)], rounds))
    if layerwise and largest_row is not None:
        largest_row.grads += largest_grad
    components = [rows[c] for c in COMPONENTS if rows[c].params]

    label = optimizer if optimizer == "adamw" else f"{optimizer} rank {rank}"
    if optimizer == "frugal":
        label = f"frugal {frugal_mode}, density {density}" if density is not None else label
    setting = f"{label}, {'8-bit' if state_bits == 8 else 'fp32'} states, {weight_dtype} weights"
    total_params = sum(c.params for c in components)
    setting += f", {_count(total_params)} parameters"
    assumptions = _assumptions(s, weight_dtype, target_modules, layerwise, frugal_mode, rounds)
    return MemoryEstimate(str(name), setting, components, assumptions)


def _assumptions(
    s: dict, weight_dtype: str, target_modules, layerwise: bool, frugal_mode: str, rounds: bool
) -> list[str]:
    out = [
        f"weights and gradients in {weight_dtype} ({DTYPE_BYTES[weight_dtype]} bytes per element); "
        + ("gradients freed parameter by parameter (layer-wise updates): only the largest is counted"
           if layerwise else "one full set of gradients"),
        "no activations, no allocator or CUDA-context overhead, no data-parallel sharding; GB = 10^9 bytes",
    ]
    if s["optimizer"] == "adamw":
        out.append("AdamW (slimtrain's dense path) on every parameter: two moments and an int64 step each")
    else:
        out.append(
            f"projected: the 2-D weights of linear layers matching target_modules={target_modules!r} "
            "(all-linear excludes the output head); embeddings, norms and the head get plain AdamW"
        )
        if s["optimizer"] == "sst":
            out.append("SST keeps U (m x d), sigma (d) and V (n x d) in fp32 as state, d = min(m, n), plus moments "
                       "for sigma and for the r sampled columns of U and V")
        elif s["optimizer"] == "frugal" and frugal_mode == "block":
            out.append("FRUGAL block mode: round(density * K) of the K projected matrices hold full AdamW state")
        else:
            r = "round(density * n)" if s["optimizer"] == "frugal" and s["density"] is not None else f"rank {s['rank']}"
            stored = f"{'an' if s['basis_dtype'] == 'fp32' else 'a'} {s['basis_dtype']} r x n basis"
            basis = {"svd": stored, "randomized": stored, "dct": "r int64 indices",
                     "columns": "r int64 indices", "random": "a seed (basis regenerated)"}[s["projector"]]
            out.append(f"projected m x n matrix (oriented so n is the projected side, proj_type={s['proj_type']!r}): "
                       f"moments of m x {r}, projector ({s['projector']}) holds {basis}")
    if s["state_bits"] == 8:
        out.append(
            f"8-bit moments: 1 byte per element + one fp32 absmax per {s['block_size']} elements, for moments of "
            f">= {s['min_8bit_size']} elements; smaller moments fp32; the 256-entry code maps are shared, not counted"
        )
    else:
        out.append("moments in fp32 (4 bytes) whatever the weight dtype (the GaLore paper's tables count them in bf16)")
    out.append("int64 step counters, seeds and indices counted (8 bytes each)"
               + ("; bf16 stochastic rounding adds a seed and a counter per parameter" if rounds else ""))
    return out


def _check(name: str, value, allowed: tuple) -> None:
    if value not in allowed or isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(str, allowed))})")


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("model", help=f"a built-in LLaMA size ({', '.join(LLAMA_SHAPES)}) or a config.json path")
    a("--optimizer", default="galore", help=f"{', '.join(OPTIMIZERS)}, or NAME8bit (default: galore)")
    a("--rank", type=int, default=None, help="projection rank (default: the GaLore paper's for the size, else 128)")
    a("--state-bits", type=int, default=32, choices=Q.STATE_BITS, help="optimizer state width (default: 32)")
    a("--weight-dtype", default="bf16", choices=tuple(DTYPE_BYTES), help="weights and gradients (default: bf16)")
    a("--target-modules", default="all-linear",
      help="'all-linear' (default) or comma-separated substrings of module names, e.g. self_attn,mlp")
    a("--projector", default=None, choices=PROJECTORS, help="projector (default: the method's)")
    a("--density", type=float, default=0.25, help="FRUGAL's state-full fraction (default: 0.25)")
    a("--frugal-mode", default="subspace", choices=("subspace", "block"), help="FRUGAL's mode (default: subspace)")
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
    try:
        est = estimate_memory(
            args.model, args.optimizer, rank=args.rank, state_bits=args.state_bits, weight_dtype=args.weight_dtype,
            target_modules=targets, projector=args.projector, density=args.density, frugal_mode=args.frugal_mode,
            min_8bit_size=args.min_8bit_size, block_size=args.block_size,
            bf16_stochastic_round=args.stochastic_round, layerwise=args.layerwise, basis_dtype=args.basis_dtype,
        )
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
