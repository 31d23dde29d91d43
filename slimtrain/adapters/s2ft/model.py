"""S²FT tuner: per-block head/channel selection, then :class:`~slimtrain.adapters.s2ft.layer.Linear` layers."""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..._seeds import generator, s2ft_selection_seed
from ..base_layers import base_layer_kind
from ..tuner import BaseTunerLayer, SlimTuner, wrapping_method
from .config import S2FTConfig
from .layer import Linear, S2FTLayer

TARGET_MODULES = {
    "llama": ["v_proj", "o_proj", "up_proj", "down_proj"],
    "mistral": ["v_proj", "o_proj", "up_proj", "down_proj"],
    "qwen2": ["v_proj", "o_proj", "up_proj", "down_proj"],
    "bert": ["attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "gpt2": ["attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}

_BLOCK_RE = re.compile(r"^(.*\.\d+)(?:\.|$)")


def block_of(key: str) -> str:
    """The transformer block a module belongs to: its name up to the last integer component ("" if none)."""
    match = _BLOCK_RE.match(key)
    return match.group(1) if match else ""


def role_of(key: str, roles: dict[str, str]) -> Optional[str]:
    """Role of a module by the longest module-name suffix in ``roles`` that it ends with."""
    for suffix in sorted(roles, key=len, reverse=True):
        if key == suffix or key.endswith("." + suffix):
            return roles[suffix]
    return None


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of ``v`` produced by the KV heads ``heads``."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def head_group_cols(heads: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Columns of ``o`` fed by every query head that attends with KV heads ``heads``.

    transformers' ``repeat_kv`` serves query head ``q`` with KV head ``q // n_rep``, so KV head ``k`` feeds query
    heads ``k·n_rep .. k·n_rep + n_rep - 1``; each query head owns ``head_dim`` contiguous columns of ``o``.
    """
    queries = (heads[:, None] * n_rep + torch.arange(n_rep)).flatten()
    return head_rows(queries, head_dim)


def select_units(
    num_units: int, k: int, selection: str, seed: int, tag: str, scores: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``k`` sorted unit ids out of ``num_units``: seeded uniform draw, or the ``k`` largest ``scores``."""
    if selection == "weight_norm":
        return torch.topk(scores, k).indices.sort().values
    g = generator(s2ft_selection_seed(seed, tag))
    return torch.randperm(num_units, generator=g)[:k].sort().values


def _check_count(option: str, k: int, num_units: int, bound: str) -> None:
    """Refuse selecting ``k`` units out of ``num_units`` (``bound`` says what ``num_units`` is)."""
    if k > num_units:
        raise ValueError(f"Invalid {option}: {k} (expected 0 <= value <= {bound})")


def _oriented_weight(module: nn.Module) -> torch.Tensor:
    """The module's (base) weight as ``out x in`` (Conv1D stores ``in x out``)."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def _squared_norms(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Float64 squared norms of the rows (``dim=1``) or columns (``dim=0``) of an ``out x in`` weight."""
    return weight.detach().to(device="cpu", dtype=torch.float64).pow(2).sum(dim)


class S2FTModel(SlimTuner):
    """Creates an S²FT model from a transformers model (``peft.get_peft_model(model, S2FTConfig(...))``).

    Selection happens per block the first time one of its modules is wrapped, over all targeted modules of
    that block, so coupled weights (v/o, up/gate/down) share one choice. The saved adapter holds the dense
    blocks and their int64 indices; loading uses the saved indices, whatever the selector would pick again.
    """

    prefix: str = "s2ft_"
    tuner_layer_cls = S2FTLayer
    layer_cls = Linear
    target_module_mapping = TARGET_MODULES

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # The per-block selection lives only for one injection: a later adapter under the same name (after
        # delete_adapter) must select afresh, and the saved indices are the record afterwards.
        self._s2ft_selection: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._s2ft_selection = {}

    def _head_geometry(self, config: S2FTConfig) -> tuple[int, int, int]:
        model_config = getattr(self.model, "config", None)
        if model_config is not None and hasattr(model_config, "get_text_config"):
            model_config = model_config.get_text_config()
        n_heads = config.num_attention_heads or getattr(model_config, "num_attention_heads", None)
        if n_heads is None:
            raise ValueError(
                "Invalid num_attention_heads: None (the model config has none; set S2FTConfig.num_attention_heads)"
            )
        n_kv = config.num_key_value_heads or getattr(model_config, "num_key_value_heads", None) or n_heads
        head_dim = config.head_dim or getattr(model_config, "head_dim", None)
        if head_dim is None:
            head_dim = model_config.hidden_size // n_heads
        if n_heads % n_kv:
            raise ValueError(
                f"Invalid num_key_value_heads: {n_kv} (expected a divisor of num_attention_heads={n_heads})"
            )
        return n_heads, n_kv, head_dim

    def _block_modules(self, config: S2FTConfig, block: str) -> dict[str, tuple[str, nn.Module]]:
        """Targeted modules of one block with a role: ``{key: (role, module)}``."""
        found = {}
        prefix = block + "." if block else ""
        for key, module in self.model.named_modules():
            if not key.startswith(prefix) or ".base_layer" in key or block_of(key) != block:
                continue
            if not isinstance(module, (nn.Linear, Conv1D, S2FTLayer)):
                continue
            if not self._check_target_module_exists(config, key):  # excluded modules are falsy too
                continue
            role = role_of(key, config.roles)
            if role is not None:
                found[key] = (role, module)
        return found

    def _select(self, config: S2FTConfig, adapter_name: str, block: str) -> dict[str, torch.Tensor]:
        """Selected KV heads and FFN channels of one block (computed once per adapter and block)."""
        cache_key = (adapter_name, block)
        if cache_key in self._s2ft_selection:
            return self._s2ft_selection[cache_key]
        modules = self._block_modules(config, block)
        selection: dict[str, torch.Tensor] = {}

        attn = {k: (r, m) for k, (r, m) in modules.items() if r.startswith("attn")}
        if attn and config.num_heads_per_block > 0:
            n_heads, n_kv, head_dim = self._head_geometry(config)
            n_rep = n_heads // n_kv
            by_norm = config.selection == "weight_norm"
            scores = torch.zeros(n_kv, dtype=torch.float64)
            for key, (role, module) in attn.items():
                w = _oriented_weight(module)
                if role == "attn_rows":
                    if w.shape[0] != n_kv * head_dim:
                        raise ValueError(
                            f"Invalid target module {key}: out_features={w.shape[0]} (expected num_key_value_heads"
                            f" * head_dim = {n_kv} * {head_dim}; set S2FTConfig head geometry or module_roles)"
                        )
                    if by_norm:  # KV head k owns rows k·hd .. (k+1)·hd - 1
                        scores += _squared_norms(w, 1).reshape(n_kv, head_dim).sum(1)
                else:
                    if w.shape[1] != n_heads * head_dim:
                        raise ValueError(
                            f"Invalid target module {key}: in_features={w.shape[1]} (expected num_attention_heads"
                            f" * head_dim = {n_heads} * {head_dim}; set S2FTConfig head geometry or module_roles)"
                        )
                    if by_norm:  # KV group k owns columns k·n_rep·hd .. (k+1)·n_rep·hd - 1
                        scores += _squared_norms(w, 0).reshape(n_kv, n_rep * head_dim).sum(1)
            _check_count("num_heads_per_block", config.num_heads_per_block, n_kv, f"num_key_value_heads = {n_kv}")
            heads = select_units(
                n_kv, config.num_heads_per_block, config.selection, config.seed, f"{block}/attn", scores
            )
            selection["attn_rows"] = head_rows(heads, head_dim)
            selection["attn_cols"] = head_group_cols(heads, n_rep, head_dim)

        ffn = {k: (r, m) for k, (r, m) in modules.items() if r.startswith("ffn")}
        if ffn and config.num_channels_per_block > 0:
            sizes = {}
            scores = 0.0
            for key, (role, module) in ffn.items():
                w = _oriented_weight(module)
                sizes[key] = w.shape[0] if role == "ffn_rows" else w.shape[1]
                if len(set(sizes.values())) > 1:
                    raise ValueError(f"Invalid FFN targets in block {block!r}: channel counts differ {sizes}")
                if config.selection == "weight_norm":
                    scores = scores + _squared_norms(w, 1 if role == "ffn_rows" else 0)
            n_channels = next(iter(sizes.values()))
            _check_count("num_channels_per_block", config.num_channels_per_block, n_channels,
                         f"{n_channels}, the FFN width")
            channels = select_units(
                n_channels, config.num_channels_per_block, config.selection, config.seed, f"{block}/ffn", scores
            )
            selection["ffn_rows"] = channels
            selection["ffn_cols"] = channels

        self._s2ft_selection[cache_key] = selection
        return selection

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        # before the role and the selection: a Conv2d or Embedding has no rows/columns of ours to select
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        base_layer_kind(base, "S2FT", allow_bnb8bit=False)
        role = role_of(current_key, config.roles)
        if role is None:
            raise ValueError(
                f"Invalid target module {current_key}: no S²FT role (expected its name to end with one of "
                f"{sorted(config.roles)}; add it to S2FTConfig.module_roles)"
            )
        index = self._select(config, adapter_name, block_of(current_key)).get(role)
        if index is None:  # this kind (attention or FFN) selects nothing per block: leave the module as is
            return
        axis = 0 if role.endswith("rows") else 1
        if isinstance(target, S2FTLayer):
            target.update_layer(adapter_name, config, current_key, axis, index, config.inference_mode)
            return
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"Target module {current_key!r} is already wrapped by another PEFT method ({wrapping_method(target)}); "
                "S2FT cannot stack on it. Wrap a fresh base model, or unload() the other adapter first."
            )
        new_module = Linear(target, adapter_name, config, current_key, axis, index)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an extra adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse a checkpoint whose dense blocks come without the indices that place them."""
        for key in [k for k in state_dict if k.endswith(".s2ft_delta")]:
            stem = key[: -len(".s2ft_delta")]
            if f"{stem}.s2ft_index" not in state_dict:
                raise ValueError(
                    f"Invalid S²FT checkpoint: {stem} has a trained block but no s2ft_index; the selection is part "
                    "of the adapter and is not re-derived at load time."
                )
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
