"""Build galore-torch-style parameter groups from a model and a choice of target modules."""

from __future__ import annotations

import re

import torch
from torch import nn

# transformers' GPT-2 style Conv1D stores a Linear's weight transposed; it is a matrix all the same.
_LINEAR_TYPES: tuple[type, ...] = (nn.Linear,)
try:  # pragma: no cover - transformers is a dependency, but keep this module importable without it
    from transformers.pytorch_utils import Conv1D

    _LINEAR_TYPES = (nn.Linear, Conv1D)
except ImportError:  # pragma: no cover
    pass


def _matches(name: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return re.fullmatch(targets, name) is not None or re.search(targets, name) is not None
    return any(t in name for t in targets)


def low_rank_param_groups(
    model: nn.Module,
    target_modules: str | list[str] = "all-linear",
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    exclude: list[str] | None = None,
    **group_options,
) -> list[dict]:
    """Split a model's parameters into a projected group and a plain AdamW group.

    The projected group holds the weights of the linear layers (``nn.Linear`` and transformers'
    ``Conv1D``) whose qualified module name matches ``target_modules``; everything else (embeddings,
    norms, biases, the output head unless targeted) goes to the plain group. This is the idea of
    transformers' ``optim_target_modules`` and of fira's ``divide_params``.

    Args:
        model: the model.
        target_modules: a list of substrings (a module matches if its name contains any), a regular
            expression string (searched in the name), or ``"all-linear"`` (every linear layer except
            one named like an output head: ``lm_head``, ``classifier``, ``score``).
        rank, update_proj_gap, scale, proj_type: the projected group's keys (galore-torch names).
        exclude: substrings of module names never projected, even if targeted.
        group_options: further keys for the projected group (e.g. ``projector="dct"``, ``lr=...``).

    Returns:
        ``[{"params": plain}, {"params": projected, "rank": ..., ...}]``; the plain group is omitted when
        empty.

    Raises:
        ValueError: if no linear layer matches ``target_modules``, or all that match are frozen. Frozen matches
            are left out (an optimizer steps only what trains); unfreeze them first to have them projected.
    """
    if isinstance(target_modules, list) and not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"Invalid target_modules: {target_modules!r} (expected a list of strings, a regex or 'all-linear')")
    exclude = list(exclude or [])
    if target_modules == "all-linear":
        exclude += ["lm_head", "classifier", "score"]
    projected: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    frozen: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, _LINEAR_TYPES) or not _matches(name, target_modules):
            continue
        if any(e in name for e in exclude):
            continue
        w = module.weight
        if not w.requires_grad:
            frozen.append(name)
        elif id(w) not in seen:
            projected.append(w)
            seen.add(id(w))
    if not projected and frozen:
        raise ValueError(
            f"Invalid target_modules: {target_modules!r} matches {len(frozen)} linear layers, all frozen "
            f"(requires_grad=False: {', '.join(frozen[:8])}{', ...' if len(frozen) > 8 else ''}): unfreeze them "
            "(module.requires_grad_(True)) before building the groups, or target trainable layers"
        )
    if not projected:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, _LINEAR_TYPES)][:8]
        raise ValueError(
            f"Invalid target_modules: {target_modules!r} matches no linear layer of the model "
            f"(linear layers include: {', '.join(linear_names) or 'none'})"
        )
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    proj_group = {
        "params": projected,
        "rank": rank,
        "update_proj_gap": update_proj_gap,
        "scale": scale,
        "proj_type": proj_type,
        **group_options,
    }
    return ([{"params": plain}] if plain else []) + [proj_group]
