"""LoLDU tuner: wraps the targeted layers of a model in :class:`~slimtrain.adapters.loldu.layer.Linear`."""

from __future__ import annotations

import torch

from ..tuner import SlimTuner
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

# Checkpoint entries that must accompany each trained diagonal (checkpoint_mode="factors"): with them the update
# is rebuilt exactly, whatever pivots a new LU of the base weight would choose on the loading machine.
_FACTOR_KEYS = ("loldu_L", "loldu_U", "loldu_d0", "loldu_perm")


class LoLDUModel(SlimTuner):
    """Creates a LoLDU model from a transformers model (``peft.get_peft_model(model, LoLDUConfig(...))``).

    Injection factors every targeted weight (float64 LU on CPU: about ``2/3·n³`` flops for an ``n x n``
    weight, ~1 s for 4096²). The saved adapter holds, per layer, the trained diagonal plus the frozen top-``r``
    factors (``L_r``, ``U_r``, ``d₀``) and the row-order index vector: ``r·(out + in + 2)`` floats and ``out``
    ints, never the ``out x in`` weight. Loading rebuilds the update from those, not from a new LU. With
    ``checkpoint_mode="fingerprint"`` it holds only the diagonal (and τ) plus a 32-byte fingerprint of the
    factors; loading then keeps the factors of the new LU and refuses them if their fingerprint differs.
    """

    prefix: str = "loldu_"
    tuner_layer_cls = LoLDULayer
    layer_cls = Linear
    target_module_mapping = TARGET_MODULES

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """``checkpoint_mode="fingerprint"`` leaves the frozen factors out of the file (their fingerprint stays)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if getattr(config, "checkpoint_mode", "factors") == "fingerprint":
            dropped = tuple(f".{name}.{adapter_name}" for name in _FACTOR_KEYS)
            selected = {k: v for k, v in selected.items() if not k.endswith(dropped)}
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Refuse a checkpoint that holds a trained diagonal without the factors it multiplies (or, in
        fingerprint mode, without the fingerprint of factors equal to the ones just recomputed); read the 0-d
        ``loldu_scale`` of checkpoints saved before it had shape (1,). Runs before anything is loaded.
        """
        fingerprint_mode = getattr(config, "checkpoint_mode", "factors") == "fingerprint"
        for key in [k for k in state_dict if k.endswith(".loldu_diag")]:
            stem = key[: -len(".loldu_diag")]
            needed = ("loldu_fingerprint",) if fingerprint_mode else _FACTOR_KEYS
            missing = [name for name in needed if f"{stem}.{name}" not in state_dict]
            if missing:
                raise ValueError(
                    f"Invalid LoLDU checkpoint: {stem} has a trained diagonal but lacks {missing}. The update is only "
                    "defined with the saved factors (or, with checkpoint_mode='fingerprint', their fingerprint); "
                    "re-deriving them from the base weight could pick other pivots."
                )
            if fingerprint_mode:
                continue
            perm = state_dict[f"{stem}.loldu_perm"]
            if perm.dtype.is_floating_point or not torch.equal(
                torch.sort(perm.long().flatten()).values, torch.arange(perm.numel(), device=perm.device)
            ):
                raise ValueError(
                    f"Invalid LoLDU checkpoint: {stem}.loldu_perm is not a permutation of 0..{perm.numel() - 1}"
                )
        for key in [k for k in state_dict if k.endswith(".loldu_scale") and state_dict[k].dim() == 0]:
            state_dict[key] = state_dict[key].reshape(1)  # saved before the scale became (1,) for FSDP
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        if fingerprint_mode:
            cls._check_fingerprints(model, adapter_name, remapped)
        return remapped

    @staticmethod
    def _check_fingerprints(model, adapter_name: str, remapped: dict) -> None:
        suffix = f".loldu_fingerprint.{adapter_name}"
        for key, saved in remapped.items():
            if not key.endswith(suffix):
                continue
            name = key[: -len(suffix)]
            ours = model.get_submodule(name).loldu_fingerprint[adapter_name]
            if ours.is_meta:
                raise ValueError(
                    f"Invalid LoLDU load of {name}: checkpoint_mode='fingerprint' recomputes the factors from the "
                    "base weight, which low_cpu_mem_usage=True leaves on the meta device; load without it."
                )
            if not torch.equal(saved.cpu(), ours.cpu()):
                raise ValueError(
                    f"Invalid LoLDU checkpoint for {name}: the factors recomputed from this base weight have "
                    f"fingerprint {_hex(ours)}, the checkpoint was trained on factors with fingerprint "
                    f"{_hex(saved)} (another base weight, dtype, device or LAPACK build pivots differently). "
                    "Nothing was loaded; save with checkpoint_mode='factors' to reload anywhere."
                )


def _hex(fingerprint: torch.Tensor) -> str:
    return fingerprint.cpu().contiguous().view(torch.uint8).numpy().tobytes().hex()[:16]
