"""Configuration of slimtrain's standalone DoRA (Liu et al., ICML 2024, "DoRA: Weight-Decomposed Low-Rank
Adaptation")."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..._validation import check_float, check_int
from ..config import SlimConfig
from ..registry import peft_type_member


@dataclass
class DoraConfig(SlimConfig):
    """DoRA: the adapted weight is a trainable per-output-row magnitude times the normalized direction of
    W + dW, with dW a LoRA update. Use it where LoRA under-fits at a given rank; it costs one (out x in)
    norm per layer per forward, so merge before inference.

    ::

        dW = (dora_alpha / r) * B A        A: (r, in) Kaiming-uniform, B: (out, r) zeros
        W' = m * (W + dW) / ||W + dW||_row  m: (out,) init ||W||_row; the norm is detached (paper §4.3)
        y  = W'x + b = Wx + b + (g - 1) Wx + g dW x,  g = m / ||W + dW||_row

    Same numbers as ``peft.LoraConfig(use_dora=True)`` (tested), except rows with ||W + dW|| <= ``dora_eps``
    keep g = 1 where PEFT returns NaN (PEFT issue #2049). With dropout off, Wx is taken from the base
    output instead of a second matmul.

    Args:
        r (int, default 8): rank of dW.
        dora_alpha (float, default 8.0): dW is scaled by dora_alpha / r.
        dora_dropout (float, default 0.0): dropout on the adapter input (then Wx is recomputed on it, as PEFT).
        dora_eps (float, default 1e-12): norm threshold of the zero-row guard.
        init_weights (bool, default True): False draws a non-zero B (tests only).
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in LoraConfig.
    """

    r: int = field(default=8)
    dora_alpha: float = field(default=8.0)
    dora_dropout: float = field(default=0.0)
    dora_eps: float = field(default=1e-12)
    init_weights: bool = field(default=True)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_member("DORA")
        check_int("r", self.r, 1)
        check_float("dora_alpha", self.dora_alpha, -1e30, 1e30)
        check_float("dora_dropout", self.dora_dropout, 0.0, 1.0, high_open=True)
        check_float("dora_eps", self.dora_eps, 0.0, 1.0)
        self._check_common()
