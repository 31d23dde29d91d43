"""NOLA tuner: wraps the targeted layers of a model in :class:`~slimtrain.adapters.nola.layer.Linear`."""

from __future__ import annotations

from .._common import SlimTuner
from .layer import Linear, NolaLayer


class NolaModel(SlimTuner):
    """Creates a NOLA model from a transformers model (use ``peft.get_peft_model(model, NolaConfig(...))``).

    The saved adapter holds the k + l coefficients per layer (plus ``out`` magnitudes with ``use_dora``); the
    bases are a function of ``config.seed`` and the module name and are regenerated on load.
    """

    prefix: str = "nola_"
    tuner_layer_cls = NolaLayer
    layer_cls = Linear
