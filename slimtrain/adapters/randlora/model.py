"""RandLoRA tuner: builds the shared bases once per adapter (from the seed, on the model's device, never
saved) and wraps the targeted layers."""

from __future__ import annotations

import math

from torch import nn

from ..base_layers import base_layer_kind, in_out_features
from ..tuner import BaseTunerLayer, SlimTuner
from ..registry import peft_api
from .config import RandLoraConfig
from .layer import Linear, RandLoraLayer, generated_basis, make_bases, make_basis_A


class RandLoraModel(SlimTuner):
    """Creates a RandLoRA model (use ``peft.get_peft_model(model, slimtrain.adapters.RandLoraConfig(...))``).

    The shared bases live in ``self.slimrandlora_basis_A`` and ``self.slimrandlora_basis_B``, non-persistent
    ``BufferDict``s keyed by adapter name (shared with every layer, so ``delete_adapter`` frees them), sized to
    the largest targeted layer and sliced per layer; they never reach ``state_dict`` or the saved adapter, and
    are regenerated from ``config.seed`` on load. With ``cache_bases=False`` B is not stored: ``self.slimrandlora_generated[adapter]`` describes it (a
    :class:`~.layer.GeneratedBasis`) and the layers' products with it generate it inside the kernels.
    """

    prefix: str = "slimrandlora_"
    tuner_layer_cls = RandLoraLayer
    layer_cls = Linear
    weighted_combination_refusal = (
        "its update sum_j B_j diag(lambda_j) A diag(gamma_j) multiplies lambda by gamma, so a weighted sum of "
        "two RandLoRA updates (lambda gamma^T of rank 2 per basis block) is in general no single (lambda, gamma)"
    )

    def _pre_injection_hook(self, model: nn.Module, config: RandLoraConfig, adapter_name: str) -> None:
        self._ensure_bases(model, config, adapter_name)

    def _ensure_bases(self, model: nn.Module, config: RandLoraConfig, adapter_name: str) -> None:
        """Build ``adapter_name``'s bases once (PEFT runs the pre-injection hook only for the first adapter,
        not for ``add_adapter``, so layer creation calls this too)."""
        bases = getattr(self, "slimrandlora_basis_A", None)
        if bases is not None and adapter_name in bases:
            return
        model_config = self.get_model_config(model)
        config = self._prepare_adapter_config(config, model_config)
        d_max = D_max = 0
        for key, module in model.named_modules():
            if not self._check_target_module_exists(config, key):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            kind = base_layer_kind(base, "slimrandlora")  # unsupported targets fail here, clearly
            fin, fout = in_out_features(base, kind)
            d_max, D_max = max(d_max, min(fin, fout)), max(D_max, max(fin, fout))
        if d_max == 0:
            return  # no target: PEFT raises its own "target modules not found" error next
        if getattr(self, "slimrandlora_basis_A", None) is None:
            self.slimrandlora_basis_A = peft_api.BufferDict({}, persistent=False)
            self.slimrandlora_basis_B = peft_api.BufferDict({}, persistent=False)
        if getattr(self, "slimrandlora_generated", None) is None:
            self.slimrandlora_generated = {}
        device = next((p.device for p in model.parameters()), None)
        n_max = math.ceil(d_max / config.r)
        if config.cache_bases:
            A, B = make_bases(config.seed, config.r, d_max, D_max, n_max,
                              generator_version=config.generator_version, device=device)
            self.slimrandlora_basis_B[adapter_name] = B
        else:  # generator version 2 (the config checks it): A alone is stored, r/D of B's size
            A = make_basis_A(config.seed, config.r, d_max, device=device)
            self.slimrandlora_generated[adapter_name] = generated_basis(config.seed, config.r, D_max, n_max)
        self.slimrandlora_basis_A[adapter_name] = A

    def _layer_extras(self, config, adapter_name: str) -> dict:
        self._ensure_bases(self.model, config, adapter_name)
        return {"basis_A": getattr(self, "slimrandlora_basis_A", None),
                "basis_B": getattr(self, "slimrandlora_basis_B", None),
                "generated": getattr(self, "slimrandlora_generated", None)}
