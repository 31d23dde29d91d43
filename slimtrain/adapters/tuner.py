"""The tuner base class of every slimtrain adapter: PEFT's ``BaseTuner`` plus the create-or-update-and-replace
boilerplate, model building that changes nothing when it refuses, and ``add_weighted_adapter``."""

from __future__ import annotations

import copy
import math

from .._validation import check_choice
from .delta_layer import DeltaLayer
from .registry import peft_api
from .rollback import restored_on_failure

BaseTunerLayer = peft_api.BaseTunerLayer


def wrapping_method(layer: BaseTunerLayer) -> str:
    """What a PEFT tuner layer is, for messages: ``peft.tuners.lora.layer.Linear`` rather than ``Linear``."""
    return f"{type(layer).__module__}.{type(layer).__qualname__}"


class SlimTuner(peft_api.BaseTuner):
    """``BaseTuner`` + the create-or-update boilerplate. Subclasses set ``prefix``, ``tuner_layer_cls``
    (the layer mixin) and ``layer_cls`` (the concrete ``nn.Module`` wrapper, constructed as
    ``layer_cls(target, adapter_name, config, key, **extras)``), and may override :meth:`_layer_extras` to
    hand shared state (e.g. a model-level basis ``BufferDict``) to layers.

    Building is all or nothing: when ``get_peft_model``, ``add_adapter`` or ``add_weighted_adapter`` refuses a
    target, the model (its modules, parameters, buffers, ``requires_grad`` flags and ``peft_config``) is left
    exactly as it was before the call (:mod:`slimtrain.adapters.rollback`).
    """

    target_module_mapping = peft_api.LORA_TARGET_MODULES
    layer_cls: type = None
    #: Why a weighted sum of this method's updates is not an update of the method (``None``: it is, and the layers
    #: implement ``add_weighted(target, adapters, weights, key)``).
    weighted_combination_refusal: str | None = None

    def __init__(self, model, peft_config, adapter_name, **kwargs) -> None:
        # PEFT's BaseTuner writes the new config into the model's existing peft_config (a model wrapped before)
        # before it injects anything: a refused injection must take that back too.
        with restored_on_failure(model):
            super().__init__(model, peft_config, adapter_name, **kwargs)

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        with restored_on_failure(self):
            super().inject_adapter(model, adapter_name, *args, **kwargs)

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
        if isinstance(target, BaseTunerLayer):
            raise TypeError(
                f"Target module {current_key!r} is already wrapped by another PEFT method ({wrapping_method(target)}); "
                f"{self.layer_cls.method_name} cannot stack on it. Wrap a fresh base model, or unload() the other "
                "adapter first."
            )
        new_module = self.layer_cls(target, adapter_name, config, current_key, **extras)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an extra adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "linear") -> None:
        """Add ``adapter_name``, whose update in every layer is ``sum_k weights[k] * ΔW[adapters[k]]`` exactly (to
        the rounding of the adapter's dtype), as PEFT's LoRA does with ``combination_type="cat"``.

        Only methods whose ``ΔW`` is linear in its trained tensors over factors the adapters share can do this
        (LoLDU over the same LDU factors, S²FT over the same rows or columns); the others refuse with the reason.
        The new adapter takes the first adapter's config and is not active until ``set_adapter``.

        Args:
            adapters: names of this model's adapters, all adapting the same modules.
            weights: one finite float per adapter (negative allowed: a difference of adapters).
            adapter_name: the name of the new adapter (not taken yet).
            combination_type: ``"linear"``, the weighted sum of the updates (the only one).

        Raises:
            RuntimeError: for a method whose weighted updates are not an update of the method.
            ValueError: for an unknown adapter, a taken name, weights of another length or not finite, adapters
                that adapt different modules or (per layer) do not share their factors. Nothing is changed then.
        """
        if self.weighted_combination_refusal is not None:
            raise RuntimeError(
                f"{type(self).__name__} cannot combine adapters by weight: {self.weighted_combination_refusal}"
            )
        check_choice("combination_type", combination_type, ("linear",))
        adapters, weights = list(adapters), list(weights)
        unknown = [a for a in adapters if a not in self.peft_config]
        if not adapters or unknown:
            raise ValueError(f"Invalid adapters: {adapters!r} (expected a non-empty list of {sorted(self.peft_config)})")
        if len(weights) != len(adapters) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise ValueError(f"Invalid weights: {weights!r} (expected {len(adapters)} finite numbers, one per adapter)")
        if adapter_name in self.peft_config:
            raise ValueError(f"Invalid adapter_name: {adapter_name!r} (an adapter of that name exists)")
        holders = {a: sorted(n for n, m in self.model.named_modules()
                             if isinstance(m, self.tuner_layer_cls) and a in m.scaling) for a in adapters}
        differ = [a for a in adapters if holders[a] != holders[adapters[0]]]
        if differ:
            raise ValueError(
                f"Invalid adapters: {differ} adapt other modules than {adapters[0]!r}; a weighted combination is "
                "built per layer, over adapters that all adapt it"
            )
        self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapters[0]])
        try:
            with restored_on_failure(self):
                self.inject_adapter(self.model, adapter_name)
                for key in holders[adapters[0]]:
                    self.model.get_submodule(key).add_weighted(adapter_name, adapters, weights, key)
        except BaseException:
            del self.peft_config[adapter_name]
            raise
