"""S²FT layers: a dense trainable block over selected rows or columns of a frozen weight, index-based.

``axis == 0`` ("rows", e.g. v/up/gate): ``y = W x + scatter_idx(Δ x)``, Δ of shape ``|idx| x in``.
``axis == 1`` ("cols", e.g. o/down):    ``y = W x + Δ x[idx]``,          Δ of shape ``out x |idx|``.

Indices are in the original weight layout, so ``ΔW`` exports and merges onto the unpermuted base directly
(the official code trains in a permuted copy and never saves the permutation).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..._seeds import generator, stable_seed
from ..delta_layer import DeltaLayer, DeltaModule
from ..registry import peft_api

BufferDict = peft_api.BufferDict


class _SelectedColumnsLinear(torch.autograd.Function):
    """``x[..., idx] @ Δᵀ`` whose backward keeps only ``x[..., idx]`` alive (partial backpropagation).

    ``index_select`` copies, so the full activation ``x`` is not referenced by the graph (a slicing view would
    keep its whole storage alive). Saved: ``|idx|/in`` of the activation plus Δ.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, delta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        x_sel = x.index_select(-1, index)
        ctx.save_for_backward(x_sel, delta, index)
        ctx.in_features, ctx.x_dtype = x.shape[-1], x.dtype
        return F.linear(x_sel, delta)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_sel, delta, index = ctx.saved_tensors
        grad_out = grad_out.to(delta.dtype)  # under autocast the incoming gradient may be lower precision
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            g_sel = (grad_out @ delta).to(ctx.x_dtype)
            grad_x = g_sel.new_zeros(*g_sel.shape[:-1], ctx.in_features).index_copy_(-1, index, g_sel)
        if ctx.needs_input_grad[1]:
            x_flat = x_sel.reshape(-1, x_sel.shape[-1]).to(delta.dtype)
            grad_delta = grad_out.reshape(-1, grad_out.shape[-1]).T @ x_flat
        return grad_x, grad_delta, None


def s2ft_delta_output(x: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    """``x @ ΔWᵀ`` for the sparse-structured ``ΔW``: shape ``(..., |idx|)`` for rows, ``(..., out)`` for cols.

    Rows need the full ``x`` for ``dΔ = g[..., idx]ᵀ x`` (plain autograd saves exactly that); columns go through
    `_SelectedColumnsLinear`, which saves only the selected input slice.
    """
    if axis == 0:
        return F.linear(x, delta)
    return _SelectedColumnsLinear.apply(x, delta, index)


def s2ft_delta_weight(delta: torch.Tensor, index: torch.Tensor, axis: int, shape: tuple[int, int]) -> torch.Tensor:
    """Dense ``ΔW`` (``out x in``) with ``delta`` scattered into the selected rows (axis 0) or columns (axis 1)."""
    return delta.new_zeros(shape).index_copy(axis, index, delta)


class S2FTLayer(DeltaLayer):
    """Per-adapter dense block, index buffer and axis of one weight, keyed by adapter name.

    The block is fp32 for fp32/bf16/fp16 bases (`DeltaLayer`'s contract; float64 for a float64 base); the
    indices are an int64 BufferDict saved with the adapter; the axis follows from the module's role and is
    re-derived on load.
    """

    adapter_layer_names = ("s2ft_delta",)
    other_param_names = ("s2ft_index", "s2ft_axis", "scaling")
    method_name = "S2FT"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_base(base_layer, allow_bnb8bit=False, **kwargs)
        self.s2ft_delta = nn.ParameterDict({})
        self.s2ft_index = BufferDict({}, persistent=True)
        self.s2ft_axis: dict[str, int] = {}

    def update_layer(
        self, adapter_name: str, config, key: str, axis: int, index: torch.Tensor, inference_mode: bool = False
    ) -> None:
        if axis not in (0, 1):
            raise ValueError(f"Invalid axis: {axis!r} (expected 0 for rows or 1 for columns)")
        size = self.out_features if axis == 0 else self.in_features
        index = torch.as_tensor(index, dtype=torch.int64).flatten().cpu()
        if index.numel() == 0 or index.min() < 0 or index.max() >= size or index.unique().numel() != index.numel():
            raise ValueError(f"Invalid index for {key} axis {axis}: expected distinct values in [0, {size - 1}]")
        shape = (index.numel(), self.in_features) if axis == 0 else (self.out_features, index.numel())
        if config.init_weights:
            delta = torch.zeros(shape)
        else:  # test-only: a deterministic non-zero block, seeded from the module name
            delta = 0.02 * torch.randn(shape, generator=generator(stable_seed("s2ft-init", key)))
        # fp32 for fp32/bf16/fp16 bases (DeltaLayer's contract), float64 for a float64 base
        delta = delta.to(torch.promote_types(self.get_base_layer().weight.dtype, torch.float32))
        self.scaling[adapter_name] = 1.0  # S²FT has no scale; DeltaLayer keys adapters by this dict
        self.s2ft_delta[adapter_name] = nn.Parameter(delta)
        self.s2ft_index[adapter_name] = index
        self.s2ft_axis[adapter_name] = axis
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        target = device if device is not None else self.get_base_layer().weight.device
        if adapter_name in self.s2ft_index and target.type != "meta":
            self.s2ft_index[adapter_name] = self.s2ft_index[adapter_name].to(target)

    def adapter_output(self, adapter: str, x: torch.Tensor, want_delta: bool):
        """The additive output over all ``out`` features (rows scattered into place)."""
        delta, index, axis = self.s2ft_delta[adapter], self.s2ft_index[adapter], self.s2ft_axis[adapter]
        out = s2ft_delta_output(x, delta, index, axis)
        if axis == 0:
            out = out.new_zeros(*out.shape[:-1], self.out_features).index_copy(-1, index, out)
        return out, None

    def _add_adapter(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        # Rows: add only the |idx| selected output features in place of a dense zero-padded tensor.
        delta, index, axis = self.s2ft_delta[adapter], self.s2ft_index[adapter], self.s2ft_axis[adapter]
        out = s2ft_delta_output(x.to(delta.dtype), delta, index, axis).to(result.dtype)
        return result.index_add(-1, index, out) if axis == 0 else result + out

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``ΔW`` (``out x in``, float32) over the original layout: zero outside the selected slice."""
        with torch.no_grad():
            delta = self.s2ft_delta[adapter].float()
            index = self.s2ft_index[adapter].to(delta.device)
            return s2ft_delta_weight(delta, index, self.s2ft_axis[adapter], (self.out_features, self.in_features))

    def _add_to_base(self, adapter: str, sign: float, safe_merge: bool = False) -> None:
        """``W[idx] ± Δ`` on the selected rows or columns only, added in float32 and rounded once."""
        weight = self.get_base_layer().weight.data
        axis = self.s2ft_axis[adapter]
        conv1d = self.kind == "conv1d"  # Conv1D stores (in, out): rows of ΔW are its columns
        dim = 1 - axis if conv1d else axis
        block = self.s2ft_delta[adapter].detach().to(device=weight.device, dtype=torch.float32)
        block = block.T if conv1d else block
        index = self.s2ft_index[adapter].to(weight.device)
        new_slice = (weight.index_select(dim, index).to(torch.float32) + sign * block).to(weight.dtype)
        if safe_merge and not torch.isfinite(new_slice).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        weight.index_copy_(dim, index, new_slice)

    def _merge_one(self, adapter: str, safe_merge: bool) -> None:
        self._add_to_base(adapter, 1.0, safe_merge)

    def _unmerge_one(self, adapter: str) -> None:
        self._add_to_base(adapter, -1.0)

    def add_weighted(self, target: str, adapters: list[str], weights: list[float], key: str) -> None:
        """Make ``target``'s update ``sum_k weights[k] * ΔW[adapters[k]]``: over the same rows (or columns) the
        blocks add up, exactly as the dense updates do (the scatter into ``ΔW`` is exact)."""
        index, axis = self.s2ft_index[adapters[0]], self.s2ft_axis[adapters[0]]
        other = [a for a in adapters if self.s2ft_axis[a] != axis or not torch.equal(self.s2ft_index[a], index)]
        if other or self.s2ft_delta[target].shape != self.s2ft_delta[adapters[0]].shape:
            raise ValueError(
                f"Invalid adapters for add_weighted_adapter at {key}: {other or [target]} train other rows or columns "
                f"than {adapters[0]!r}; S²FT blocks add up only over the same selection"
            )
        dtype = torch.promote_types(self.s2ft_delta[target].dtype, torch.float32)
        with torch.no_grad():
            block = sum(w * self.s2ft_delta[a].to(dtype) for a, w in zip(adapters, weights))
            self.s2ft_delta[target].copy_(block)
        self.s2ft_index[target] = index.clone()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False


class Linear(DeltaModule, S2FTLayer):
    """S²FT around an ``nn.Linear`` or a transformers ``Conv1D``."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config, key: str, axis: int, index: torch.Tensor, **kwargs
    ) -> None:
        nn.Module.__init__(self)
        self.init_layer(base_layer, adapter_name, **kwargs)
        self.update_layer(adapter_name, config, key, axis, index, inference_mode=config.inference_mode)
