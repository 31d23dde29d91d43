"""Configuration of slimtrain's RandLoRA (Albert et al., ICLR 2025, "RandLoRA: full-rank parameter-efficient
fine-tuning of large models")."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..._validation import check_bool, check_choice, check_float, check_int
from ..bases import GENERATOR_VERSION, check_seed
from ..config import SlimConfig
from ..registry import peft_type_member

FORWARD_MODES = ("auto", "factored", "dense")


@dataclass
class RandLoraConfig(SlimConfig):
    """RandLoRA: a full-rank update built from frozen shared random bases with trainable diagonal scalings.
    Use it when LoRA's rank limit hurts (large data, hard tasks) but a LoRA-sized parameter budget is wanted.

    For a layer with d = min(in, out), D = max(in, out) and n = ceil(d / r)::

        dW (D x d) = (alpha / r) * sum_{j<n} B_j diag(lambda_j) A diag(gamma_j)
        B_j: D x r and A: r x d frozen, unit variance, shared by all layers (sliced), regenerated from ``seed``
        lambda: (r, n) init 0 (so dW = 0 at init), gamma: (n, d) init 1/D     -> r*n + n*d trainable
        dW is transposed when out < in.

    Differences from ``peft.RandLoraConfig`` (same math, checked against it in tests): the bases are never
    written to the checkpoint (PEFT 0.21.2 writes them once per layer: 2.2 GB for a 3B model) but generated
    from the seed by Philox on the model's device as U(-sqrt(3), sqrt(3)) (PEFT divides a Kaiming-uniform
    draw by its empirical std: the same unit variance, but not bit-identical across devices); and the
    forward picks, per call, between PEFT's factored path (x -> rank n*r -> out) and a dense path that
    builds dW once per forward and, when it can, folds it into the base matmul ``F.linear(x, W + dW)``;
    dense is cheaper once the call has more tokens than about in*out/(in+out).

    Args:
        r (int, default 32): rank of each random basis; trainable parameters fall as r grows (~d^2/r).
        randlora_alpha (float, default 640.0): the update is scaled by randlora_alpha / r (PEFT's default,
            20 x r; lower it, or the learning rate, if training is unstable).
        randlora_dropout (float, default 0.0): dropout on the adapter input (disables the fused path).
        seed (int, default 0): seed of the shared bases, in [0, 2**63 - 1].
        cache_bases (bool, default True): keep the shared basis B (D_max x n_max x r fp32, about one weight of
            the largest targeted layer, once per adapter) in memory. False never stores it: every product
            with B runs in a kernel that generates the tiles of B it reads from the seed
            (``slimtrain.kernels.basis_matmul``), in forward and backward; the same bases and results up to
            summation order, for the cost of regenerating B on every use (docs/kernels.md gives the measured
            cost). The small A (r x d_max) is kept either way. Needs generator_version 2.
        forward_mode ("auto" | "factored" | "dense", default "auto").
        use_dora (bool, default False), dora_eps (float, default 1e-12): DoRA re-scaling on top (+out params).
        init_weights (bool, default True): False draws non-zero lambda (tests only).
        generator_version (int, default 2): how bases are drawn from the seed, recorded in adapter_config.json.
            2: Philox on the model's device, U(-sqrt(3), sqrt(3)). 1: the CPU generator and empirical-std
            scaling of adapters saved before version 2 (still reload exactly). Other values raise ``ValueError``.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in LoraConfig.

    Not supported: PEFT's ``sparse``/``very_sparse`` ternary bases (no speed or memory benefit there either).
    """

    r: int = field(default=32, metadata={"help": "Rank of each random basis."})
    randlora_alpha: float = field(default=640.0, metadata={"help": "The update is scaled by randlora_alpha / r."})
    randlora_dropout: float = field(default=0.0)
    seed: int = field(default=0, metadata={"help": "Seed of the shared random bases."})
    forward_mode: str = field(default="auto", metadata={"help": "auto | factored | dense"})
    cache_bases: bool = field(default=True, metadata={"help": "Keep the shared basis B in memory (False: "
                                                              "generate it inside the matmul kernels)."})
    use_dora: bool = field(default=False)
    dora_eps: float = field(default=1e-12)
    init_weights: bool = field(default=True)
    generator_version: int = field(default=GENERATOR_VERSION)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_member("SLIMRANDLORA")
        check_int("r", self.r, 1)
        check_float("randlora_alpha", self.randlora_alpha, -1e30, 1e30)
        check_float("randlora_dropout", self.randlora_dropout, 0.0, 1.0, high_open=True)
        check_float("dora_eps", self.dora_eps, 0.0, 1.0)
        check_seed(self.seed)
        check_choice("forward_mode", self.forward_mode, FORWARD_MODES)
        check_int("generator_version", self.generator_version, 1, GENERATOR_VERSION)
        check_bool("cache_bases", self.cache_bases)
        if not self.cache_bases and self.generator_version < 2:
            raise ValueError(
                f"Invalid cache_bases: False with generator_version {self.generator_version} (version-1 bases "
                "come from a CPU generator that no kernel can reproduce: keep cache_bases=True)"
            )
        self._check_common()


SlimRandLoraConfig = RandLoraConfig
