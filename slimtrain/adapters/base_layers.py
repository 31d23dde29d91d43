"""Which base layers a tuner may wrap, and their shapes.

bitsandbytes is recognised by module name, so it is never imported here unless the model already uses it.
"""

from __future__ import annotations

from torch import nn

from .registry import peft_api


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
    load_instead = "in 8-bit (load_in_8bit=True) or in bf16" if allow_bnb8bit else "in bf16 or fp16"
    if _is_bnb(layer, "Linear4bit"):
        raise TypeError(
            f"{method} does not support bitsandbytes 4-bit base layers ({type(layer).__name__}): merging "
            f"needs a dequantize/requantize round trip it does not implement. Supported: {supported}. "
            f"Load the model {load_instead} instead."
        )
    if _is_bnb(layer, "Linear8bitLt"):
        if not allow_bnb8bit:
            raise TypeError(
                f"{method} does not support bitsandbytes 8-bit base layers ({type(layer).__name__}): it needs a "
                f"float weight to adapt and merge into. Supported: {supported}. Load the model {load_instead} instead."
            )
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
