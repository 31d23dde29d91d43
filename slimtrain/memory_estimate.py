"""What :func:`slimtrain.memory.estimate_memory` counts and how: the options (:class:`MemoryOptions`), the
optimizer they describe built on the model, and the bytes per model component (:class:`MemoryEstimate`).

The optimizer state is counted from the optimizer's own declaration (:meth:`LowRankAdamW.state_spec
<slimtrain.optimizers.base.LowRankAdamW.state_spec>`: every slot's bytes, in the column of its kind), on an
optimizer built with the options given, so what the optimizers refuse is refused here with their own
message, and nothing is re-derived: the estimate equals ``optimizer.state_bytes()`` after the first step,
byte for byte (``tests/test_memory.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._validation import check_choice, check_int_choice
from .optimizers import OPTIMIZERS, LowRankAdamW, low_rank_param_groups
from .optimizers._validation import STATE_BITS
from .optimizers.projectors import PROJECTORS, StoredBasisProjector
from .optimizers.registry import EIGHT_BIT_SUFFIX, Method, get_method, option_owners

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head", "other")
# The table's state columns, by the kind each slot declares (slimtrain.optimizers.state.KINDS).
COLUMNS = {"moment": "moments", "absmax": "absmax", "projector": "projector", "scalar": "counters"}
# The projectors that store an r x n float basis, and so take a basis_dtype.
BASIS_PROJECTORS = tuple(name for name, cls in PROJECTORS.items() if issubclass(cls, StoredBasisProjector))


@dataclass(frozen=True)
class MemoryOptions:
    """What is counted besides the model: the optimizer's options (checked by the optimizer itself when it is
    built), the weights' dtype and whether gradients are freed parameter by parameter.

    Attributes:
        rank: the projection rank (``None``: the GaLore paper's for a built-in size, else 128).
        state_bits: 32 or 8 (moments of at least ``min_8bit_size`` elements in 8 bits).
        weight_dtype: ``"bf16"`` (default, as the paper), ``"fp16"`` or ``"fp32"``; gradients match.
        target_modules: which linear layers are projected (see :func:`low_rank_param_groups`).
        projector: the projector's name (default: the method's).
        proj_type, min_8bit_size, block_size, bf16_stochastic_round: as the optimizers' options.
        basis_dtype: ``"fp32"`` or ``"bf16"``: how the ``svd`` and ``randomized`` projectors store their basis
            (their ``basis_dtype`` option).
        layerwise: gradients are stepped and freed one parameter at a time
            (:class:`~slimtrain.optimizers.LayerwiseStepper`), so only the largest is counted.
        method_options: the method's own options (FRUGAL's ``density`` and ``mode``, ...), passed to its
            constructor; the method's defaults where not given.
    """

    rank: int | None = None
    state_bits: int = 32
    weight_dtype: str = "bf16"
    target_modules: str | list[str] = "all-linear"
    projector: str | None = None
    proj_type: str = "std"
    min_8bit_size: int = 4096
    block_size: int = 256
    bf16_stochastic_round: bool = False
    layerwise: bool = False
    basis_dtype: str = "fp32"
    method_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, **settings) -> MemoryOptions:
        """Options from keywords: this class's fields, and any other keyword as a method option."""
        fields = {k: settings.pop(k) for k in list(settings) if k in cls.__dataclass_fields__}
        method_options = {**fields.pop("method_options", {}), **settings}
        return cls(**fields, method_options=method_options)


def optimizer_names() -> tuple[str, ...]:
    """What ``optimizer`` may be: ``adamw`` (slimtrain's dense path), every registered method and its 8-bit twin."""
    return ("adamw", *OPTIMIZERS)


def resolve_method(name: str) -> tuple[Method | None, bool]:
    """``(method, 8-bit)`` for an optimizer name (``None`` for ``adamw``); a ``NAME8bit`` name keeps 8-bit states."""
    base = name.removesuffix(EIGHT_BIT_SUFFIX) if isinstance(name, str) else name
    if base == "adamw" or name in OPTIMIZERS:
        return (None if base == "adamw" else get_method(base)), base != name
    raise ValueError(f"Invalid optimizer: {name!r} (expected one of {', '.join(optimizer_names())})")


def build_optimizer(model: torch.nn.Module, method: Method | None, options: MemoryOptions) -> LowRankAdamW:
    """The optimizer ``options`` describe, on ``model``'s parameters (nothing is allocated before a step). Built
    with fp32 states and then told its groups keep ``state_bits`` (the declaration reads only the groups), so an
    estimate of 8-bit states needs no bitsandbytes."""
    name = "adamw" if method is None else method.name
    check_choice("weight_dtype", options.weight_dtype, tuple(DTYPES))
    check_int_choice("state_bits", options.state_bits, STATE_BITS)
    mine = (method.options | ({"mode"} if method.modes else set())) if method is not None else set()
    for key, value in options.method_options.items():
        if key not in mine:
            owner = option_owners().get(key)
            raise ValueError(f"Invalid {key}: {value!r} ({name} takes no {key}"
                             + (f"; it is an option of {owner})" if owner else ")"))
    rule = LowRankAdamW.rule_type if method is None else method.rule_type(options.method_options.get("mode"))
    uses_projector = method is not None and rule.uses_projector
    projector = options.projector
    if method is None and projector is not None:
        raise ValueError(f"Invalid projector: {projector!r} (adamw projects no matrix)")
    if options.basis_dtype != "fp32":
        if projector is None and uses_projector:
            projector = method.optimizer.default_projector
        if projector not in BASIS_PROJECTORS:
            keeps = f"with projector {projector!r} keeps none" if uses_projector else "keeps none"
            raise ValueError(f"Invalid basis_dtype: {options.basis_dtype!r} (only the {' and '.join(BASIS_PROJECTORS)} "
                             f"projectors store a basis; {name} {keeps})")
        projector = PROJECTORS[projector](basis_dtype=options.basis_dtype)
    kwargs = dict(min_8bit_size=options.min_8bit_size, block_size=options.block_size,
                  bf16_stochastic_round=options.bf16_stochastic_round)
    if method is None:
        optimizer = LowRankAdamW(model.parameters(), **kwargs)
    else:
        if projector is not None:  # else the method's default; a rule that uses none refuses one
            kwargs["projector"] = projector
        groups = low_rank_param_groups(model, options.target_modules, rank=options.rank, proj_type=options.proj_type)
        optimizer = method.optimizer(groups, **kwargs, **options.method_options)
    if options.state_bits == 8 and not rule.capabilities.eight_bit:
        raise ValueError(f"Invalid state_bits: 8 ({name} keeps no 8-bit states: {rule.capabilities.reason})")
    for group in optimizer.param_groups:
        group["state_bits"] = options.state_bits
    return optimizer


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
    """The result of :func:`~slimtrain.memory.estimate_memory`: one :class:`Component` per model part, and the
    setting."""

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


def count_memory(model_name: str, model: torch.nn.Module, method: Method | None, options: MemoryOptions) -> MemoryEstimate:
    """Weights, gradients and the state of the optimizer ``method`` and ``options`` describe, per component."""
    optimizer = build_optimizer(model, method, options)
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    dtype = DTYPES[options.weight_dtype]
    rows = {c: Component(c) for c in COMPONENTS}
    largest_grad, largest_row = 0, None
    seen: set[int] = set()
    for pname, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue  # tied weights are one tensor
        seen.add(id(p))
        row = rows[component_of(pname)]
        nbytes = p.numel() * dtype.itemsize
        row.params += p.numel()
        row.weights += nbytes
        if nbytes > largest_grad:
            largest_grad, largest_row = nbytes, row
        if not options.layerwise:
            row.grads += nbytes
        # The state of a weight in `weight_dtype` (a meta model is built in fp32): rounding streams for bf16.
        for slot in optimizer.state_spec(p, groups[id(p)], dtype=dtype):
            setattr(row, COLUMNS[slot.kind], getattr(row, COLUMNS[slot.kind]) + slot.nbytes)
    if options.layerwise and largest_row is not None:
        largest_row.grads += largest_grad
    components = [rows[c] for c in COMPONENTS if rows[c].params]
    setting = (f"{_label(method, optimizer, options.rank)}, {'8-bit' if options.state_bits == 8 else 'fp32'} states, "
               f"{options.weight_dtype} weights, {_count(sum(c.params for c in components))} parameters")
    return MemoryEstimate(model_name, setting, components, _assumptions(method, optimizer, options))


def _label(method: Method | None, optimizer: LowRankAdamW, rank: int) -> str:
    if method is None:
        return "adamw"
    density = optimizer.defaults.get("density")
    if "density" in method.options and density is not None:
        mode = method.mode_of(optimizer.rule)
        return f"{' '.join(filter(None, (method.name, mode)))}, density {density}"
    return f"{method.name} rank {rank}"


def _assumptions(method: Method | None, optimizer: LowRankAdamW, options: MemoryOptions) -> list[str]:
    rounds = options.bf16_stochastic_round and options.weight_dtype == "bf16"
    out = [
        f"weights and gradients in {options.weight_dtype} ({DTYPES[options.weight_dtype].itemsize} bytes per element); "
        + ("gradients freed parameter by parameter (layer-wise updates): only the largest is counted"
           if options.layerwise else "one full set of gradients"),
        "no activations, no allocator or CUDA-context overhead, no data-parallel sharding; GB = 10^9 bytes",
    ]
    if method is None:
        out.append("AdamW (slimtrain's dense path) on every parameter: two moments and an int64 step each")
    else:
        out.append(
            f"projected: the 2-D weights of linear layers matching target_modules={options.target_modules!r} "
            "(all-linear excludes the output head); embeddings, norms and the head get plain AdamW"
        )
        group = next(g for g in optimizer.param_groups if "rank" in g)
        projector = optimizer.projector(group) if optimizer.rule.uses_projector else None
        note = optimizer.rule.describe_state(group, projector)
        if note:
            out.append(note)
    if options.state_bits == 8:
        out.append(
            f"8-bit moments: 1 byte per element + one fp32 absmax per {options.block_size} elements, for moments of "
            f">= {options.min_8bit_size} elements; smaller moments fp32; the 256-entry code maps are shared, not counted"
        )
    else:
        out.append("moments in fp32 (4 bytes) whatever the weight dtype (the GaLore paper's tables count them in bf16)")
    out.append("int64 step counters, seeds and indices counted (8 bytes each)"
               + ("; bf16 stochastic rounding adds a seed and a counter per parameter" if rounds else ""))
    return out
