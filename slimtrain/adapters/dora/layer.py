"""Standalone DoRA layer: LoRA factors + a magnitude vector; the DoRA algebra is the shared one in
:class:`slimtrain.adapters.delta_layer.DeltaLayer` (also used by ``use_dora=True`` on NOLA and RandLoRA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..delta_layer import DeltaLayer, DeltaModule
from .config import DoraConfig


class DoraLayer(DeltaLayer):
    adapter_layer_names = ("dora_A", "dora_B", "dora_magnitude")
    other_param_names = ("dora_dropout", "r", "scaling", "use_dora", "dora_eps")
    magnitude_name = "dora_magnitude"
    method_name = "dora"

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self._init_base(base_layer, **kwargs)
        self.r: dict[str, int] = {}
        self.dora_A = nn.ParameterDict({})
        self.dora_B = nn.ParameterDict({})
        self.dora_magnitude = nn.ParameterDict({})
        self.dora_dropout = nn.ModuleDict({})

    def update_layer(self, adapter_name: str, config: DoraConfig, key: str, inference_mode: bool = False):
        r = check_rank(config.r, self.in_features, self.out_features, key)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = config.dora_alpha / r
        p = config.dora_dropout
        self.dora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # LoRA's init: U(-1/sqrt(in), 1/sqrt(in))
        B = torch.zeros(self.out_features, r)
        if not config.init_weights:
            nn.init.normal_(B, std=0.1)
        self.dora_A[adapter_name] = nn.Parameter(A)
        self.dora_B[adapter_name] = nn.Parameter(B)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self._init_dora(adapter_name, True, config.dora_eps)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def dropout_for(self, adapter: str) -> nn.Module:
        return self.dora_dropout[adapter]

    def adapter_output(self, adapter: str, x: torch.Tensor, want_delta: bool):
        A, B, s = self.dora_A[adapter], self.dora_B[adapter], self.scaling[adapter]
        out = F.linear(F.linear(x, A), B) * s
        delta = (B.detach() @ A.detach()) * s if want_delta else None
        return out, delta

    def delta_weight(self, adapter: str) -> torch.Tensor:
        with torch.no_grad():
            return (self.dora_B[adapter].float() @ self.dora_A[adapter].float()) * self.scaling[adapter]


def check_rank(r: int, in_features: int, out_features: int, key: str) -> int:
    if r > min(in_features, out_features):
        raise ValueError(
            f"Invalid r: {r} for {key!r} (expected 1 <= r <= {min(in_features, out_features)} for a layer of shape "
            f"({out_features}, {in_features}))"
        )
    return r


class Linear(DeltaModule, DoraLayer):
    """DoRA around an ``nn.Linear``, a transformers ``Conv1D`` or a bitsandbytes ``Linear8bitLt``."""
