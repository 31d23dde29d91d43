"""The tuner-layer base class of every slimtrain adapter: merge / unmerge / safe-merge and the optional DoRA
rescaling, written once for any method that can produce an adapter output and a dense ``ΔW``."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .base_layers import base_layer_kind, in_out_features
from .dora_scaling import dora_row_norm, dora_scale
from .registry import peft_api


class DeltaLayer(peft_api.BaseTunerLayer):
    """A tuner layer whose adapter is an additive ``ΔW`` (optionally DoRA-rescaled).

    Subclasses set ``adapter_layer_names``/``other_param_names``, the name of their magnitude
    ``ParameterDict`` in ``magnitude_name``, and implement:

    * ``update_layer(adapter_name, config, key)``: create the adapter's parameters;
    * ``adapter_output(adapter, x, want_delta) -> (y, delta | None)``: the adapter's additive output for input ``x``
      (already dropped-out and cast), and, when ``want_delta`` is true, the dense ``ΔW`` of shape
      (out, in) it came from (used for DoRA's norm, detached);
    * ``delta_weight(adapter) -> Tensor``: dense ``ΔW`` (out, in) in fp32, for merging.

    Adapter parameters are kept in fp32 whatever the base dtype; their output is cast to the base output
    dtype (the same contract as PEFT's ``autocast_adapter_dtype=True``, the default). With
    ``autocast_adapter_dtype=False`` the trainable tensors (``adapter_layer_names``) take the base weight's
    floating dtype instead (:meth:`cast_adapter_to_base_dtype`), as PEFT's LoRA does.
    """

    magnitude_name: str = ""
    method_name: str = ""

    def _init_base(self, base_layer: nn.Module, *, allow_bnb8bit: bool = True, **kwargs) -> None:
        self.base_layer = base_layer
        self.kind = base_layer_kind(self.get_base_layer(), self.method_name, allow_bnb8bit=allow_bnb8bit)
        self.quantization_backend = (
            peft_api.resolve_quantization_backend(self.get_base_layer()) if self.kind == "bnb8bit" else None
        )
        self.in_features, self.out_features = in_out_features(self.get_base_layer(), self.kind)
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.dora_eps: dict[str, float] = {}
        self._dora_merge_scale: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

    # -- weights in (out, in) orientation, dequantized --------------------------------------------------
    def oriented_base_weight(self) -> torch.Tensor:
        """The base weight as (out, in) in its own dtype, differentiable: the parameter itself (a transposed view for
        Conv1D), so a trainable base weight gets its gradient through every forward path; for bnb 8-bit a
        dequantized copy (the int8 weight never trains)."""
        base = self.get_base_layer()
        if self.kind == "bnb8bit":
            return self.quantization_backend.get_base_weight(base)
        return base.weight.T if self.kind == "conv1d" else base.weight

    def dense_base_weight(self) -> torch.Tensor:
        """:meth:`oriented_base_weight`, detached: for norms, merging and other reads outside autograd."""
        return self.oriented_base_weight().detach()

    def _write_base_weight(self, w_out_in: torch.Tensor) -> None:
        w = w_out_in.T.contiguous() if self.kind == "conv1d" else w_out_in
        if self.kind == "bnb8bit":
            self.quantization_backend.set_base_weight(self, w.to(torch.float16))
        else:
            base = self.get_base_layer()
            base.weight.data = w.to(base.weight.dtype)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # Device only: adapters stay fp32 (PEFT's version would round a freshly computed magnitude to bf16).
        base = self.get_base_layer()
        if device is None:
            device = next((t.device for t in base.parameters()), None)
        if device is None:
            return
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if isinstance(container, nn.ParameterDict) and adapter_name in container:
                item = container[adapter_name]
                if item.device != device and item.device.type != "meta":
                    container[adapter_name] = nn.Parameter(item.to(device), requires_grad=item.requires_grad)
            elif isinstance(container, nn.ModuleDict) and adapter_name in container:
                container[adapter_name].to(device)

    def cast_adapter_to_base_dtype(self, adapter_name: str) -> None:
        """Give ``adapter_name``'s trainable tensors the base weight's dtype when it is a floating type below
        fp32 (``autocast_adapter_dtype=False``); frozen factors and buffers keep their precision."""
        dtype = self.get_base_layer().weight.dtype
        if not dtype.is_floating_point or dtype.itemsize >= 4:
            return
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name in container and container[adapter_name].dtype != dtype:
                item = container[adapter_name]
                container[adapter_name] = nn.Parameter(item.detach().to(dtype), requires_grad=item.requires_grad)

    def _init_dora(self, adapter_name: str, use_dora: bool, eps: float) -> None:
        self.use_dora[adapter_name] = use_dora
        self.dora_eps[adapter_name] = eps
        if use_dora:
            # m = ‖W + ΔW‖_row at init (ΔW is usually 0 here; including it keeps init output-preserving anyway)
            with peft_api.gather_params_ctx(self.get_base_layer().weight):
                w = self.dense_base_weight()
                delta = self.delta_weight(adapter_name)
                if delta.is_meta:
                    # PeftModel.from_pretrained(low_cpu_mem_usage=True): the adapter weights are still on the
                    # meta device, and the magnitude, a saved parameter, is about to be loaded over this one.
                    magnitude = torch.empty(self.out_features, dtype=torch.float32, device="meta")
                else:
                    magnitude = dora_row_norm(w, delta.to(w.device))
            magnitudes = getattr(self, self.magnitude_name)
            magnitudes[adapter_name] = nn.Parameter(magnitude)

    # -- to implement ---------------------------------------------------------------------------------
    def adapter_output(self, adapter: str, x: torch.Tensor, want_delta: bool):  # pragma: no cover
        raise NotImplementedError

    def delta_weight(self, adapter: str) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def adapter_dtype(self, adapter: str) -> torch.dtype:
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter in container:
                return container[adapter].dtype
        return torch.float32

    def dropout_for(self, adapter: str) -> nn.Module:
        return nn.Identity()

    # -- PEFT's API -----------------------------------------------------------------------------------
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """ΔW in the base weight's own layout ((in, out) for Conv1D), for PEFT utilities."""
        delta = self.delta_weight(adapter)
        return delta.T if self.kind == "conv1d" else delta

    def _merged_weight(self, adapter: str, w: torch.Tensor) -> torch.Tensor:
        """``w`` with ``adapter`` merged: ``w + ΔW``, or ``g (w + ΔW)`` with DoRA.

        With several active adapters the forward composes them in order, each DoRA one rescaling what came
        before it (``result`` already holds the earlier adapters' outputs), but every ``g`` is taken from the
        norm of the *unmerged* base weight, ``‖W + ΔW‖_row``, as in the forward. ``w`` holds the adapters
        merged before this one, so the norm is taken from :meth:`_unmerged_base_weight`, not from ``w`` (as
        PEFT's LoRA DoRA variant does).
        """
        delta = self.delta_weight(adapter).to(w.device)
        merged = w.float() + delta
        if self.use_dora.get(adapter, False):
            norm = dora_row_norm(self._unmerged_base_weight(w), delta)
            g = dora_scale(getattr(self, self.magnitude_name)[adapter].detach(), norm, self.dora_eps[adapter])
            self._dora_merge_scale[adapter] = g
            merged = g[:, None] * merged
        return merged

    def _unmerged_base_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (out, in) with every merged adapter of this layer undone, latest first, in fp32."""
        restored = w.float()
        for adapter in reversed(self.merged_adapters):
            if adapter not in self.scaling:
                continue
            if self.use_dora.get(adapter, False):
                restored = restored / self._dora_merge_scale[adapter][:, None]
            restored = restored - self.delta_weight(adapter).to(w.device)
        return restored

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in peft_api.check_adapters_to_merge(self, adapter_names):
            if adapter in self.scaling:
                self._merge_one(adapter, safe_merge)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.scaling:
                self._unmerge_one(adapter)

    def _merge_one(self, adapter: str, safe_merge: bool) -> None:
        """Add ``adapter``'s update to the base weight (refusing a non-finite result with ``safe_merge``)."""
        w = self.dense_base_weight()
        merged = self._merged_weight(adapter, w)
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        self._write_base_weight(merged.to(w.dtype))

    def _unmerge_one(self, adapter: str) -> None:
        """Take ``adapter``'s update (the last merged) out of the base weight."""
        w = self.dense_base_weight()
        restored = w.float()
        if self.use_dora.get(adapter, False):
            restored = restored / self._dora_merge_scale.pop(adapter)[:, None]
        restored = restored - self.delta_weight(adapter).to(w.device)
        self._write_base_weight(restored.to(w.dtype))

    def _base_without_bias(self, result: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.get_base_layer(), "bias", None)
        return result if bias is None else result - bias.to(result.dtype)

    def _add_adapter(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout_for(adapter)
        xd = dropout(x.to(self.adapter_dtype(adapter)))
        use_dora = self.use_dora.get(adapter, False)
        out, delta = self.adapter_output(adapter, xd, want_delta=use_dora)
        if not use_dora:
            return result + out.to(result.dtype)
        w = self.oriented_base_weight()  # once: for bnb 8-bit each call dequantizes the weight
        g = dora_scale(getattr(self, self.magnitude_name)[adapter], dora_row_norm(w, delta), self.dora_eps[adapter])
        if isinstance(dropout, nn.Identity) or not self.training:
            # dropout is a no-op: W x is already inside `result`, reuse it (saves one full matmul)
            base = self._base_without_bias(result).float()
        else:
            base = F.linear(xd, w.to(xd.dtype)).float()
        return (result.float() + (g - 1) * base + g * out.float()).to(result.dtype)

    def _forward_active(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Unmerged forward with adapters on; subclasses may override for a fused path."""
        result = self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.quantization_backend.maybe_clone_base_result(result)
        for adapter in self.active_adapters:
            if adapter in self.scaling:
                result = self._add_adapter(adapter, x, result)
        return result

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif self.merged:
            result = self.base_layer(x, *args, **kwargs)
        else:
            result = self._forward_active(x, *args, **kwargs)
        return result.to(previous_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return not self.use_dora.get(adapter_name, False)

    def __repr__(self) -> str:
        return f"{self.method_name}." + nn.Module.__repr__(self)


class DeltaModule(nn.Module):
    """The module PEFT puts in a targeted layer's place, in PEFT's order: ``nn.Module`` first, then the method's
    :class:`DeltaLayer` subclass (``class Linear(DeltaModule, NolaLayer)``), so the layer's forward and repr are
    named here. Built as PEFT builds one: around ``base_layer`` (``kwargs`` go to the layer class), with the adapter
    ``adapter_name`` of ``config``; a method whose ``update_layer`` takes more overrides ``__init__``."""

    forward = DeltaLayer.forward
    __repr__ = DeltaLayer.__repr__

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, key: str, **kwargs) -> None:
        super().__init__()
        self.init_layer(base_layer, adapter_name, **kwargs)
        self.update_layer(adapter_name, config, key)

    def init_layer(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        """The method's layer around ``base_layer``, ``adapter_name`` active (before ``update_layer`` adds it)."""
        layer_type = next(c for c in type(self).__mro__ if issubclass(c, DeltaLayer) and not issubclass(c, DeltaModule))
        layer_type.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
