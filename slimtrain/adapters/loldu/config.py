"""Configuration of LoLDU (Shi et al., 2024, arXiv 2410.13618)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..._validation import check_choice, check_float, check_int
from ..config import SlimConfig
from ..registry import peft_type_member

_BIAS_CHOICES = ("none", "all", "loldu_only")
CHECKPOINT_MODES = ("factors", "fingerprint")


@dataclass
class LoLDUConfig(SlimConfig):
    """Configuration of a [`LoLDUModel`].

    LoLDU factors each targeted weight once, at injection, as ``W = P L D U`` (partially pivoted LU computed
    in float64 on CPU, ``D = diag(U)`` pulled out so ``L`` and ``U`` are unit-triangular) and trains only the
    diagonal of the first ``r`` pivots. Use it when the trainable budget must be tiny (``r`` numbers per
    matrix); it cannot express updates outside the span of the first ``r`` LU columns/rows.

    The update is

        ΔW = P · L_r · diag(s·(z − d₀) + τ·z) · U_r,     s = alpha / r

    with ``z`` (``r`` entries, initialised to ``d₀ = D[:r]``) trainable, τ a trainable scalar only when
    ``train_scale=True`` (the paper's σ = s + τ) and everything else frozen, so ΔW is exactly zero at
    initialisation and the wrapped model computes the base model's output bit for bit. ``P`` is kept as an
    index vector (``loldu_perm``), never as a dense matrix.

    Args:
        r (`int`, defaults to 8): number of leading LU pivots whose diagonal entries train. Must satisfy
            ``1 <= r <= min(out_features, in_features)`` for every targeted layer.
        alpha (`float`, defaults to 1.0): the scale is ``alpha / r`` (the official code's default
            ``lora_alpha=1``, so ``1/r``).
        train_scale (`bool`, defaults to False): also train the scalar τ (one extra parameter per layer).
        target_modules (`list[str] | str`): module names (suffix match) or a regex (full match) to adapt.
            ``nn.Linear`` and transformers' ``Conv1D`` (orientation detected from the layer type) are supported;
            quantized bases (bitsandbytes 8-bit/4-bit) are refused with a ``TypeError``: the LU needs a float
            weight and merging would need a dequantize/requantize round trip.
        exclude_modules (`list[str] | str`): names or regex of modules to skip.
        bias (`str`, defaults to "none"): "none", "all" or "loldu_only".
        modules_to_save (`list[str]`): extra modules to train and save (e.g. a classifier head).
        init_weights (`bool`, defaults to True): ``False`` perturbs ``z`` at init so that the adapter is not
            the identity; for tests only.
        checkpoint_mode (`str`, defaults to "factors"): what ``save_pretrained`` writes per matrix.
            "factors": the diagonal plus the frozen factors, ``r·(out + in + 2)`` floats and ``out`` ints; reload
            is exact anywhere. "fingerprint": the paper's promise, only the ``r`` trained numbers (+ τ) and a
            SHA-256 fingerprint of the frozen factors; loading recomputes the LU of the base weight and refuses
            (``ValueError`` naming the module, nothing loaded) when its factors' fingerprint differs, e.g. on
            another LAPACK build, device or base-weight dtype, or another base model.
        layers_to_transform / layers_pattern: as in PEFT's LoRA.
    """

    r: int = field(default=8, metadata={"help": "Number of leading LU pivots whose diagonal is trained."})
    alpha: float = field(default=1.0, metadata={"help": "Scale numerator: the scale is alpha / r."})
    train_scale: bool = field(default=False, metadata={"help": "Also train a scalar offset of the scale."})
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 'loldu_only'."})
    init_weights: bool = field(default=True, metadata={"help": "False perturbs z at init (tests only)."})
    checkpoint_mode: str = field(default="factors", metadata={"help": f"One of {CHECKPOINT_MODES}."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_member("LOLDU")
        check_int("r", self.r, 1)
        check_float("alpha", self.alpha, 1e-30, 1e30)
        check_choice("bias", self.bias, _BIAS_CHOICES)
        check_choice("checkpoint_mode", self.checkpoint_mode, CHECKPOINT_MODES)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("Invalid layers_pattern: it is only used together with layers_to_transform.")
        self._check_common()
