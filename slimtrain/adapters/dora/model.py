"""Standalone DoRA tuner."""

from __future__ import annotations

from ..tuner import SlimTuner
from .layer import DoraLayer, Linear


class DoraModel(SlimTuner):
    """Creates a DoRA model (use ``peft.get_peft_model(model, slimtrain.adapters.DoraConfig(...))``).
    Saves ``dora_A``, ``dora_B`` and ``dora_magnitude`` per layer: r (in + out) + out numbers."""

    prefix: str = "dora_"
    tuner_layer_cls = DoraLayer
    layer_cls = Linear
    weighted_combination_refusal = (
        "its weight m * (W + B A) / ||W + B A||_row is not linear in the adapter (a row norm, and the product "
        "B A), so a weighted sum of two DoRA updates is no DoRA update"
    )
