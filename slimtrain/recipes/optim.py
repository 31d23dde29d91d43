"""The one place the recipes and benchmarks build an optimizer, and measure what its state holds.

The names come from the method registry (:mod:`slimtrain.optimizers.registry`), so a registered method is a
recipe name with no edit here:

- ``OPTIMIZER_NAMES``: torch's AdamW (``adamw``) and each slimtrain method with its 8-bit twin (``galore``,
  ``galore8bit``, ...).
- ``VARIANT_NAMES``: a method run another way, as its registry entry says (``frugal-block`` is
  ``FrugalAdamW(mode="block")``, the FRUGAL paper's pre-training split), and ``spectral-sst``, SST as the
  paper runs it: the model's attention and MLP layers replaced by their factors (:func:`prepare_model`) and
  trained by ``SpectralSSTAdamW``.
- ``RECIPE_NAMES``: the two together, what the command line offers.
- ``REFERENCE_NAMES``: the published implementations the benchmarks compare against (``galore-torch``,
  ``apollo-torch``); their state holds Python objects, so they cannot be resumed from a ``weights_only``
  checkpoint and the command line does not offer them.

These and ``DEFAULTS`` are read from the registry whenever they are read from this module (``optim.DEFAULTS``),
so they include a method registered after the import.

Default hyperparameters are the papers' pre-training ones, in each method's registry entry: GaLore and Fira lr 0.01, scale 0.25, T 200; FRUGAL lr 1e-3, density 0.25; DCT GaLore's
(its code has no defaults for lr and scale); SST lr 1e-3, T 200; APOLLO lr 0.01, scale 1, channel-wise, and
APOLLO-Mini (``apollo-mini``) rank 1, scale 128, tensor-wise. Here: AdamW lr 1e-3; spectral SST SST's lr and T;
the reference apollo-torch APOLLO's. Rank defaults to a quarter of the smallest projected dimension, the paper's
60M ratio (128 of 512), where the method's entry sets none.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..optimizers import SpectralSSTAdamW, low_rank_param_groups, to_spectral
from ..optimizers.registry import RECIPE_RANK, Method, methods
from ..optimizers.rule import Capabilities
from .models import smallest_matrix_dim

ADAMW = "adamw"
SPECTRAL_SST = "spectral-sst"
REFERENCE_NAMES = ("galore-torch", "apollo-torch")
TARGET_MODULES = ["attn", "mlp"]
# The recipes' defaults for what is not a registered method.
_OWN_DEFAULTS: dict[str, dict] = {
    ADAMW: dict(lr=1e-3),
    SPECTRAL_SST: dict(lr=1e-3, update_proj_gap=200),  # SpectralSSTAdamW's own; it has no update scale
    "galore-torch": dict(lr=1e-2, update_proj_gap=200, scale=0.25, no_deprecation_warning=True),
    "apollo-torch": dict(lr=1e-2, update_proj_gap=200, scale=1.0, proj="random", scale_type="channel"),
}


def _entries() -> dict[str, tuple[Method, str | None, bool]]:
    """Every registered method's recipe names -> (method, variant or None, 8-bit)."""
    entries = {name: (m, *how) for m in methods() for name, how in m.recipe_names.items()}
    clash = sorted(set(entries) & set(_OWN_DEFAULTS))
    if clash:
        raise RuntimeError(f"Registered methods take the recipe names {', '.join(clash)}, which name the recipes' "
                           f"own optimizers ({', '.join(_OWN_DEFAULTS)}): register them under other names")
    return entries


def optimizer_names() -> tuple[str, ...]:
    return (ADAMW, *(name for name, (_, variant, _) in _entries().items() if variant is None))


def variant_names() -> tuple[str, ...]:
    return (*(name for name, (_, variant, _) in _entries().items() if variant is not None), SPECTRAL_SST)


def recipe_names() -> tuple[str, ...]:
    return optimizer_names() + variant_names()


def defaults() -> dict[str, dict]:
    """Each name's default hyperparameters (lr, update_proj_gap, scale and constructor options)."""
    out = dict(_OWN_DEFAULTS)
    for name, (method, variant, _) in _entries().items():
        out[name] = dict(method.recipe, **(method.variants[variant] if variant is not None else {}))
    return out


def __getattr__(name: str):
    # The name tables, computed from the registry when read (module attributes of PEP 562).
    tables = {"OPTIMIZER_NAMES": optimizer_names, "VARIANT_NAMES": variant_names, "RECIPE_NAMES": recipe_names,
              "DEFAULTS": defaults}
    if name in tables:
        return tables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_optimizer_name(name: str, allowed: tuple[str, ...] | None = None) -> None:
    """``ValueError`` unless ``name`` is in ``allowed`` (default: :func:`recipe_names`)."""
    allowed = recipe_names() if allowed is None else allowed
    if name not in allowed:
        raise ValueError(f"Invalid --optimizer: {name!r} (expected one of {', '.join(allowed)})")


def default_rank(smallest_dim: int) -> int:
    return max(1, smallest_dim // 4)


def fixed_rank(name: str) -> int | None:
    """The rank the recipe ``name`` is defined at (``apollo-mini``: 1), or ``None`` for a name that takes any."""
    return defaults().get(name, {}).get(RECIPE_RANK)


def recipe_rank(name: str, smallest_dim: int, rank: int | None = None) -> int:
    """The rank the recipe ``name`` projects at: ``rank`` where given, else the name's own (:func:`fixed_rank`), else
    :func:`default_rank`. A name defined at one rank refuses another (``ValueError`` naming ``--rank``)."""
    fixed = fixed_rank(name)
    if fixed is not None and rank is not None and rank != fixed:
        method, _, eight_bit = _entries()[name]
        other = method.name + ("8bit" if eight_bit else "")
        raise ValueError(f"Invalid --rank: {rank} ({name} is defined at rank {fixed}; leave --rank out, or use "
                         f"--optimizer {other} for another rank)")
    if rank is not None:
        return rank
    return default_rank(smallest_dim) if fixed is None else fixed


def slimtrain_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class behind the recipe name ``name`` (a variant's is its method's), or a ``RuntimeError`` saying it
    is not in this slimtrain build."""
    if name == SPECTRAL_SST:
        return SpectralSSTAdamW
    entries = _entries()
    if name not in entries:
        raise RuntimeError(f"Optimizer {name!r} is not available in this slimtrain build "
                           f"(its methods have the recipe names {', '.join(entries)})")
    method, _, eight_bit = entries[name]
    return method.optimizer_8bit if eight_bit else method.optimizer


def capabilities(name: str) -> Capabilities | None:
    """The :class:`~slimtrain.optimizers.rule.Capabilities` that the step rule of the recipe's optimizer
    ``name`` declares (shardable, layer-wise), or None for ``adamw``, ``spectral-sst`` and the references,
    which have no step rule."""
    entry = _entries().get(name)
    if entry is None:
        return None
    method, variant, _ = entry
    mode = method.variants[variant].get("mode") if variant is not None else None
    return method.rule_type(mode).capabilities


def prepare_model(name: str, model: nn.Module, *, rank: int | None = None,
                  target_modules: list[str] | str = TARGET_MODULES) -> nn.Module:
    """``model`` made ready for the optimizer ``name``, in place: for ``spectral-sst`` each ``nn.Linear``
    of ``target_modules`` becomes a ``SpectralLinear`` (``to_spectral``, ``rank`` sampled vector pairs);
    the other optimizers need nothing.

    Call it before :func:`build_optimizer` and before loading a checkpoint into ``model``: the
    checkpoint holds the factors, not the weights.
    """
    if name != SPECTRAL_SST:
        return model
    if rank is None:
        rank = default_rank(smallest_matrix_dim(model.config))
    return to_spectral(model, target_modules, rank)


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float | None = None,
    rank: int | None = None,
    update_proj_gap: int | None = None,
    scale: float | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    target_modules: list[str] | str = TARGET_MODULES,
    **extra,
) -> torch.optim.Optimizer:
    """An optimizer for ``model`` by short name; ``None`` arguments take the method's defaults (the rank: the
    name's own where its registry entry has one, as ``apollo-mini``'s 1, else a quarter of the smallest dimension).

    Low-rank methods project the 2-D weights of ``target_modules`` and give plain AdamW to the rest
    (embeddings, norms, ``lm_head``), as every official script does. ``extra`` goes to the optimizer's
    constructor (e.g. ``density`` for FRUGAL), or for ``apollo-torch`` into its projected group.
    ``spectral-sst`` needs ``model`` converted by :func:`prepare_model` first; ``rank`` and
    ``target_modules`` were given there.
    """
    check_optimizer_name(name, recipe_names() + REFERENCE_NAMES)
    hp = {**defaults()[name], **{k: v for k, v in extra.items() if v is not None}}
    default_lr = hp.pop("lr")
    base = dict(lr=default_lr if lr is None else lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == ADAMW:
        return torch.optim.AdamW(model.parameters(), **base)
    if name == SPECTRAL_SST:
        gap = hp.pop("update_proj_gap")
        unused = {**hp, **({} if scale is None else dict(scale=scale))}
        if unused:
            raise ValueError(f"Invalid options for spectral-sst: {', '.join(unused)} (SpectralSSTAdamW takes lr, "
                             "betas, eps, weight_decay and update_proj_gap)")
        return SpectralSSTAdamW(model, **base, update_proj_gap=gap if update_proj_gap is None else update_proj_gap)

    hp.pop(RECIPE_RANK, None)
    rank = recipe_rank(name, smallest_matrix_dim(model.config), rank)
    gap, default_scale = hp.pop("update_proj_gap"), hp.pop("scale")
    group = dict(
        rank=rank,
        update_proj_gap=gap if update_proj_gap is None else update_proj_gap,
        scale=default_scale if scale is None else scale,
    )
    if name == "apollo-torch":  # APOLLO reads its options from the group, not the constructor
        group.update(hp)
        hp = {}
    groups = low_rank_param_groups(model, target_modules, **group)
    return _optimizer_class(name)(groups, **base, **hp)


def _optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name in REFERENCE_NAMES:
        module, cls = {"galore-torch": ("galore_torch", "GaLoreAdamW"), "apollo-torch": ("apollo_torch", "APOLLOAdamW")}[name]
        try:
            return getattr(importlib.import_module(module), cls)
        except ImportError as e:
            raise ImportError(f"{name} is a benchmark reference: pip install {name} (or slimtrain[dev])") from e
    return slimtrain_optimizer_class(name)


def state_tensor_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every distinct tensor reachable from ``optimizer.state`` (of a DTensor, this rank's piece).

    Walks dicts, lists and plain objects too, so galore-torch's and apollo-torch's projector objects
    (which hold the projection matrix) are counted; a tensor seen twice is counted once.
    """
    seen: set[int] = set()
    total = 0
    stack = list(optimizer.state.values())
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if hasattr(obj, "to_local"):  # a DTensor (FSDP2): this rank's piece
                obj = obj.to_local()
            key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
            if key not in seen:
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
            stack.extend(vars(obj).values())
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """``optimizer.state_bytes()`` where the optimizer has it (slimtrain's), else :func:`state_tensor_bytes`."""
    if hasattr(optimizer, "state_bytes"):
        return int(optimizer.state_bytes())
    return state_tensor_bytes(optimizer)
