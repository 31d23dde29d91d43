"""Method-agnostic pieces shared by slimtrain's PEFT tuners (NOLA, RandLoRA, DoRA-like; LoLDU, S²FT may
reuse them). Nothing here knows a particular method.

* Random bases: :func:`seeded_uniform` (a basis for a given ``GENERATOR_VERSION``), :func:`uniform_on_cpu`,
  from seeds derived in :mod:`slimtrain._seeds` (``stable_seed``: hashlib, never Python's salted ``hash()``).
  Bases come from counter-based Philox (:mod:`slimtrain.kernels.philox`), generated on the target device
  with the same bits on CPU and GPU; the global RNG is never touched.
* Input checks: none of its own; the configs use :mod:`slimtrain._validation`, shared with the optimizers
  (one message format), and :func:`check_seed` below.
* :func:`base_layer_kind`: which base layers a tuner may wrap; bitsandbytes 4-bit and anything else is
  refused with a clear ``TypeError``.
* DoRA math as free functions (:func:`dora_row_norm`, :func:`dora_scale`) and :class:`DeltaLayer`, a
  ``BaseTunerLayer`` that implements merge / unmerge / safe-merge / the optional DoRA re-scaling for any
  method that can produce an adapter output and a dense ``ΔW``.
* :class:`SlimTuner`, a ``BaseTuner`` with the create-or-update-and-replace boilerplate, and
  :class:`SlimConfig`, the module-selection fields every config shares.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._seeds import MAX_SEED, generator
from .._validation import check_int, check_target_modules
from ..kernels.philox import philox_uniform
from .registry import peft_api

BaseTuner = peft_api.BaseTuner
BaseTunerLayer = peft_api.BaseTunerLayer

# How bases are drawn from a seed; configs record it (``generator_version``) so that a checkpoint always gets
# the bases it was trained with. Bump it whenever any basis changes, and keep the old path when cheap.
#   1: a CPU Mersenne Twister (``torch.Generator``) per seed, moved to the device. Still loads exactly.
#   2: Philox4x32-10 (:mod:`slimtrain.kernels.philox`), generated on the device (inside NOLA's kernels),
#      bit-identical on CPU and GPU.
GENERATOR_VERSION = 2


# ----------------------------------------------------------------------------------------- seeds, bases
def check_seed(value: Any) -> int:
    """A config's ``seed``: hashed into 63-bit Philox keys but also used as is (S²FT's selection, RandLoRA's
    test-only init), so one range for all, [0, :data:`slimtrain._seeds.MAX_SEED`]; 2**70 used to be accepted."""
    return check_int("seed", value, 0, MAX_SEED)


def seeded_uniform(shape: Iterable[int], seed: int, low: float, high: float, *, generator_version: int,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 U(low, high) of ``shape`` on ``device``, a pure function of (seed, generator_version).

    Version 2 runs Philox on ``device`` itself (a GPU never waits for a CPU draw and a copy); version 1 is
    the CPU generator of adapters saved before it, for exact reloads.
    """
    if generator_version == 1:
        return uniform_on_cpu(shape, seed, low, high).to(device)
    return philox_uniform(seed, tuple(shape), low, high, device=device)


def uniform_on_cpu(shape: Iterable[int], seed: int, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """fp32 tensor of U(low, high) drawn on a CPU generator seeded with ``seed`` (same bits on any host; the
    bases of generator version 1)."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    return out.uniform_(low, high, generator=generator(seed))


# ----------------------------------------------------------------------------------------- base layers
def _is_bnb(layer: nn.Module, cls_name: str) -> bool:
    # Checked by module name so that bitsandbytes is never imported here unless the model already uses it.
    return type(layer).__module__.startswith("bitsandbytes") and any(
        c.__name__ == cls_name for c in type(layer).__mro__
    )


def base_layer_kind(layer: nn.Module, method: str, *, allow_bnb8bit: bool = True) -> str:
    """Classify a target: ``"linear"``, ``"conv1d"`` (transformers GPT-2 style) or ``"bnb8bit"``.

    Raises ``TypeError`` for everything else, naming the layer type and what ``method`` supports.
    """
    from transformers.pytorch_utils import Conv1D

    supported = "torch.nn.Linear, transformers Conv1D" + (", bitsandbytes Linear8bitLt" if allow_bnb8bit else "")
    if _is_bnb(layer, "Linear4bit"):
        raise TypeError(
            f"{method} does not support bitsandbytes 4-bit base layers ({type(layer).__name__}): merging and "
            f"the row norms need a dequantize/requantize round trip we do not implement. Supported: {supported}. "
            f"Load the model in 8-bit (load_in_8bit=True) or in bf16 instead."
        )
    if _is_bnb(layer, "Linear8bitLt"):
        if not allow_bnb8bit:
            raise TypeError(f"{method} does not support bitsandbytes 8-bit base layers. Supported: {supported}.")
        if peft_api.resolve_quantization_backend is None:  # pragma: no cover - peft < 0.20
            raise TypeError(f"{method} on bitsandbytes 8-bit layers needs peft>=0.20 (generic quantization backend).")
        return "bnb8bit"
    if isinstance(layer, Conv1D):
        return "conv1d"
    if isinstance(layer, nn.Linear):
        return "linear"
    raise TypeError(f"{method} cannot wrap {type(layer).__name__}. Supported base layers: {supported}.")


def in_out_features(layer: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        shape = getattr(layer.weight, "ds_shape", layer.weight.shape)  # ZeRO-3 keeps the real shape here
        return int(shape[0]), int(shape[1])
    return int(layer.in_features), int(layer.out_features)


# ----------------------------------------------------------------------------------------- DoRA math
def dora_row_norm(weight: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """‖W + ΔW‖ over each output row (W, ΔW of shape (out, in)), in fp32, detached (DoRA §4.3)."""
    with torch.no_grad():
        w = weight.float()
        if delta is not None:
            w = w + delta.float()
        return torch.linalg.vector_norm(w, dim=1)


def dora_scale(magnitude: torch.Tensor, row_norm: torch.Tensor, eps: float) -> torch.Tensor:
    """g = m / ‖W + ΔW‖, and g = 1 on rows whose norm is <= eps.

    PEFT divides unguarded, so an all-zero weight row (511 of them in Llama-3.1-8B's o_proj, PEFT issue
    #2049) gives m / 0 = 0 / 0 = NaN. For such a row the direction is undefined; g = 1 makes the row behave
    like plain (un-normalized) W + ΔW, which is finite, exact at init (both are 0) and invertible on unmerge.
    """
    m = magnitude.float()
    safe = row_norm > eps
    return torch.where(safe, m / torch.where(safe, row_norm, torch.ones_like(row_norm)), torch.ones_like(m))


# ----------------------------------------------------------------------------------------- layer base
class DeltaLayer(BaseTunerLayer):
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
    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), dequantized for bnb 8-bit (a copy then), original dtype."""
        base = self.get_base_layer()
        if self.kind == "bnb8bit":
            w = self.quantization_backend.get_base_weight(base)
        else:
            w = base.weight
        w = w.detach()
        return w.T if self.kind == "conv1d" else w

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
        adapter_names = peft_api.check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.scaling:
                continue
            w = self.dense_base_weight()
            merged = self._merged_weight(adapter, w)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            self._write_base_weight(merged.to(w.dtype))
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.scaling:
                continue
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
        w = self.dense_base_weight()
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


# ----------------------------------------------------------------------------------------- tuner base
class SlimTuner(BaseTuner):
    """``BaseTuner`` + the create-or-update boilerplate. Subclasses set ``prefix``, ``tuner_layer_cls``
    (the layer mixin) and ``layer_cls`` (the concrete ``nn.Module`` wrapper, constructed as
    ``layer_cls(target, adapter_name, config, key, **extras)``), and may override :meth:`_layer_extras` to
    hand shared state (e.g. a model-level basis ``BufferDict``) to layers."""

    target_module_mapping = peft_api.LORA_TARGET_MODULES
    layer_cls: type = None

    def _layer_extras(self, config, adapter_name: str) -> dict:
        return {}

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT's hook (run after injection and loading) only ever upcasts; our layers create fp32 adapters,
        # so honouring autocast_adapter_dtype=False means casting down to the base dtype here.
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        if not autocast_adapter_dtype:
            for module in self.model.modules():
                if isinstance(module, DeltaLayer):
                    module.cast_adapter_to_base_dtype(adapter_name)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        extras = self._layer_extras(config, adapter_name)
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, config, current_key, **extras)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(target, BaseTunerLayer) and not isinstance(target, self.tuner_layer_cls):
            raise TypeError(
                f"Target module {current_key!r} is already wrapped by another PEFT method "
                f"({type(target).__name__}); {self.layer_cls.method_name} cannot stack on it."
            )
        new_module = self.layer_cls(base, adapter_name, config, current_key, **extras)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an extra adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)


# ----------------------------------------------------------------------------------------- config base
PeftConfig = peft_api.PeftConfig


@dataclass
class SlimConfig(PeftConfig):
    """Fields every slimtrain tuner config shares (module selection as in PEFT's ``LoraConfig``)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module-name suffixes (list) or a full-match regex (str); None: PEFT's LoRA defaults "
                          "for the model type."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)

    def _check_common(self) -> None:
        check_target_modules("target_modules", self.target_modules)
        if self.exclude_modules is not None:
            check_target_modules("exclude_modules", self.exclude_modules)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
