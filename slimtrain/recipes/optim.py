"""The one place the recipes and benchmarks build an optimizer, and measure what its state holds.

``OPTIMIZER_NAMES`` are torch's AdamW and slimtrain's low-rank family, one name per optimizer class.
``VARIANT_NAMES`` run one of those methods another way: ``frugal-block`` is ``FrugalAdamW(mode="block")``
(the FRUGAL paper's pre-training split), ``spectral-sst`` is SST as the paper runs it, the model's
attention and MLP layers replaced by their factors (:func:`prepare_model`) and trained by
``SpectralSSTAdamW``. ``RECIPE_NAMES``, the two together, are what the command line offers.
``REFERENCE_NAMES`` are the published implementations the benchmarks compare against
(``galore-torch``, ``apollo-torch``); their state holds Python objects, so they cannot be resumed
from a ``weights_only`` checkpoint and the command line does not offer them.

Default hyperparameters are the papers' pre-training ones (methods/optimizers.md): GaLore and Fira
lr 0.01, scale 0.25, T 200; FRUGAL lr 1e-3, density 0.25; APOLLO lr 0.01, scale 1, channel-wise,
random projection. DCT uses GaLore's (its code has no defaults for lr and scale). FRUGAL's block mode
takes FRUGAL's (density 0.25 of the matrices, ``block_order="descending"``, the official pre-training
scripts' order); spectral SST takes SST's lr 1e-3 and T 200. Rank defaults to a quarter of the smallest
projected dimension, the paper's 60M ratio (128 of 512).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .models import smallest_matrix_dim

# Each low-rank method next to its 8-bit-state twin (GaLoreAdamW8bit, ...), which takes the same defaults.
OPTIMIZER_NAMES = ("adamw",) + tuple(n for m in ("galore", "fira", "frugal", "dct", "sst") for n in (m, f"{m}8bit"))
VARIANT_NAMES = ("frugal-block", "frugal-block8bit", "spectral-sst")
RECIPE_NAMES = OPTIMIZER_NAMES + VARIANT_NAMES
REFERENCE_NAMES = ("galore-torch", "apollo-torch")
TARGET_MODULES = ["attn", "mlp"]

_LOW_RANK = dict(lr=1e-2, update_proj_gap=200, scale=0.25)
DEFAULTS: dict[str, dict] = {
    "adamw": dict(lr=1e-3),
    "galore": _LOW_RANK,
    "fira": _LOW_RANK,
    "frugal": dict(lr=1e-3, update_proj_gap=200, scale=1.0, density=0.25),
    "dct": _LOW_RANK,
    "sst": dict(lr=1e-3, update_proj_gap=200, scale=1.0),  # SSTAdamW's own default lr; scale does not apply
    "galore-torch": dict(_LOW_RANK, no_deprecation_warning=True),
    "apollo-torch": dict(lr=1e-2, update_proj_gap=200, scale=1.0, proj="random", scale_type="channel"),
}
DEFAULTS.update({f"{m}8bit": DEFAULTS[m] for m in ("galore", "fira", "frugal", "dct", "sst")})
DEFAULTS["frugal-block"] = DEFAULTS["frugal-block8bit"] = dict(DEFAULTS["frugal"], mode="block", block_order="descending")
DEFAULTS["spectral-sst"] = dict(lr=1e-3, update_proj_gap=200)  # SpectralSSTAdamW's own; it has no update scale
# The slimtrain.optimizers.OPTIMIZERS class behind a variant (its mode comes from DEFAULTS).
_CLASS_OF = {"frugal-block": "frugal", "frugal-block8bit": "frugal8bit"}


def check_optimizer_name(name: str, allowed: tuple[str, ...] = RECIPE_NAMES) -> None:
    if name not in allowed:
        raise ValueError(f"Invalid --optimizer: {name!r} (expected one of {', '.join(allowed)})")


def default_rank(smallest_dim: int) -> int:
    return max(1, smallest_dim // 4)


def slimtrain_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """``slimtrain.optimizers.OPTIMIZERS[name]`` (for a variant, its method's class), or a ``RuntimeError``
    saying it is not there yet."""
    from slimtrain.optimizers import OPTIMIZERS, SpectralSSTAdamW

    if name == "spectral-sst":
        return SpectralSSTAdamW
    name = _CLASS_OF.get(name, name)
    if name not in OPTIMIZERS:
        raise RuntimeError(
            f"Optimizer {name!r} is not available in this slimtrain build "
            f"(slimtrain.optimizers.OPTIMIZERS has: {', '.join(OPTIMIZERS)})"
        )
    return OPTIMIZERS[name]


def capabilities(name: str):
    """The :class:`~slimtrain.optimizers.rule.Capabilities` that the step rule of the recipe's optimizer
    ``name`` declares (shardable, layer-wise), or None for ``adamw``, ``spectral-sst`` and the references,
    which have no step rule."""
    if name in ("adamw", "spectral-sst") + REFERENCE_NAMES:
        return None
    if DEFAULTS[name].get("mode") == "block":
        from slimtrain.optimizers.frugal import FrugalBlockRule  # FrugalAdamW picks its rule by mode

        return FrugalBlockRule.capabilities
    return slimtrain_optimizer_class(name).rule_type.capabilities


def prepare_model(name: str, model: nn.Module, *, rank: int | None = None,
                  target_modules: list[str] | str = TARGET_MODULES) -> nn.Module:
    """``model`` made ready for the optimizer ``name``, in place: for ``spectral-sst`` each ``nn.Linear``
    of ``target_modules`` becomes a ``SpectralLinear`` (``to_spectral``, ``rank`` sampled vector pairs);
    the other optimizers need nothing.

    Call it before :func:`build_optimizer` and before loading a checkpoint into ``model``: the
    checkpoint holds the factors, not the weights.
    """
    if name != "spectral-sst":
        return model
    from slimtrain.optimizers import to_spectral

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
    """An optimizer for ``model`` by short name; ``None`` arguments take the method's defaults.

    Low-rank methods project the 2-D weights of ``target_modules`` and give plain AdamW to the rest
    (embeddings, norms, ``lm_head``), as every official script does. ``extra`` goes to the optimizer's
    constructor (e.g. ``density`` for FRUGAL), or for ``apollo-torch`` into its projected group.
    ``spectral-sst`` needs ``model`` converted by :func:`prepare_model` first; ``rank`` and
    ``target_modules`` were given there.
    """
    check_optimizer_name(name, RECIPE_NAMES + REFERENCE_NAMES)
    hp = {**DEFAULTS[name], **{k: v for k, v in extra.items() if v is not None}}
    default_lr = hp.pop("lr")
    base = dict(lr=default_lr if lr is None else lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **base)
    if name == "spectral-sst":
        gap = hp.pop("update_proj_gap")
        unused = {**hp, **({} if scale is None else dict(scale=scale))}
        if unused:
            raise ValueError(f"Invalid options for spectral-sst: {', '.join(unused)} (SpectralSSTAdamW takes lr, "
                             "betas, eps, weight_decay and update_proj_gap)")
        return slimtrain_optimizer_class(name)(model, **base, update_proj_gap=gap if update_proj_gap is None else update_proj_gap)

    from slimtrain.optimizers import low_rank_param_groups

    if rank is None:
        rank = default_rank(smallest_matrix_dim(model.config))
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
