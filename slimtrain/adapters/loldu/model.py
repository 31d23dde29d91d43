"""LoLDU tuner: wraps the targeted layers of a model in :class:`~slimtrain.adapters.loldu.layer.Linear`."""

from __future__ import annotations

import torch

from .._common import SlimTuner
from .layer import Linear, LoLDULayer

# Default targets when `target_modules` is None (the paper adapts the attention projections).
TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt2": ["c_attn"],
}

# Checkpoint entries that must accompany each trained diagonal: with them the update is rebuilt exactly,
# whatever pivots a new LU of the base weight would choose on the loading machine.
_FACTOR_KEYS = ("loldu_L", "loldu_U", "loldu_d0", "loldu_perm")


class LoLDUModel(SlimTuner):
    """Creates a LoLDU model from a transformers model (``peft.get_peft_model(model, LoLDUConfig(...))``).

    Injection factors every targeted weight (float64 LU on CPU: about ``2/3·n³`` flops for an ``n x n``
    weight, ~1 s for 4096²). The saved adapter holds, per layer, the trained diagonal plus the frozen top-``r``
    factors (``L_r``, ``U_r``, ``d₀``) and the row-order index vector: ``r·(out + in + 2)`` floats and ``out``
    ints, never the ``out x in`` weight. Loading rebuilds the update from those, not from a new LU.
    """

    prefix: str = "loldu_"
    tuner_layer_cls = LoLDULayer
    layer_cls = Linear
    target_module_mapping = TARGET_MODULES

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse a checkpoint that holds a trained diagonal without the factors it multiplies; read the 0-d
        ``loldu_scale`` of checkpoints saved before it had shape (1,).

        Re-deriving P, L, U from the base weight at load time would be silently wrong if the pivots came out
        differently (other device, dtype or LAPACK build), so the factors are always saved and required here.
        """
        for key in [k for k in state_dict if k.endswith(".loldu_diag")]:
            stem = key[: -len(".loldu_diag")]
            missing = [name for name in _FACTOR_KEYS if f"{stem}.{name}" not in state_dict]
            if missing:
                raise ValueError(
                    f"Invalid LoLDU checkpoint: {stem} has a trained diagonal but lacks {missing}. The update is only "
                    "defined with the saved factors; re-deriving them from the base weight could pick other pivots."
                )
            perm = state_dict[f"{stem}.loldu_perm"]
            if perm.dtype.is_floating_point or not torch.equal(
                torch.sort(perm.long().flatten()).values, torch.arange(perm.numel(), device=perm.device)
            ):
                raise ValueError(
                    f"Invalid LoLDU checkpoint: {stem}.loldu_perm is not a permutation of 0..{perm.numel() - 1}"
                )
        for key in [k for k in state_dict if k.endswith(".loldu_scale") and state_dict[k].dim() == 0]:
            state_dict[key] = state_dict[key].reshape(1)  # saved before the scale became (1,) for FSDP
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
