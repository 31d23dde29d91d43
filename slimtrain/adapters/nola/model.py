"""NOLA tuner: wraps the targeted layers of a model in :class:`~slimtrain.adapters.nola.layer.Linear`."""

from __future__ import annotations

import warnings

from ..tuner import SlimTuner
from .layer import Linear, NolaLayer


class NolaModel(SlimTuner):
    """Creates a NOLA model from a transformers model (use ``peft.get_peft_model(model, NolaConfig(...))``).

    The saved adapter holds the k + l coefficients per layer (plus ``out`` magnitudes with ``use_dora``); the
    bases are a function of ``config.seed`` and the module name and are regenerated on load.
    """

    prefix: str = "nola_"
    tuner_layer_cls = NolaLayer
    layer_cls = Linear
    weighted_combination_refusal = (
        "its update s * B(b) A(a) is a product of the two coefficient vectors' factors, so a weighted sum of two "
        "NOLA updates has rank up to 2r and is in general no NOLA update of rank r over the same bases"
    )

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse coefficients saved for a layer of another shape.

        Only coefficients are saved and bases are regenerated for whatever shape is found, so without this an
        adapter for hidden size 32 loads and runs on 48. Each layer's ``nola_shape`` record (out, in) must equal
        the layer it loads into. A checkpoint with no record at all was saved before the record existed: it
        loads as it always did, unchecked, with a warning (re-save it to record the shapes); one that records
        some layers and not others is refused.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        suffix = f".nola_shape.{adapter_name}"
        layers = {name: m for name, m in model.named_modules()
                  if isinstance(m, NolaLayer) and adapter_name in m.nola_shape}
        recorded = {key[: -len(suffix)]: value for key, value in remapped.items() if key.endswith(suffix)}
        if not recorded:
            if layers:
                warnings.warn(
                    f"NOLA checkpoint for adapter {adapter_name!r} has no shape record (saved by slimtrain before "
                    "it had one): its bases are regenerated for the layer shapes of this model, unchecked. Re-save "
                    "it to record them.",
                    stacklevel=2,
                )
            return remapped
        for name, layer in layers.items():
            if name not in recorded:
                raise ValueError(
                    f"Invalid NOLA checkpoint: {name} has no nola_shape record while other layers have one; "
                    "the checkpoint is incomplete."
                )
            saved = tuple(int(v) for v in recorded[name].flatten().tolist())
            found = (layer.out_features, layer.in_features)
            if saved != found:
                raise ValueError(
                    f"Invalid NOLA checkpoint for {name}: saved for a layer of shape (out, in) = {saved}, loaded into "
                    f"one of shape {found}. NOLA regenerates its bases for the shape it finds, so the adapter would "
                    "compute something else; load it into the model it was trained on."
                )
        return remapped
