"""Configuration of NOLA (Koohpayegani et al., ICLR 2024, "NOLA: Compressing LoRA using Linear Combination
of Random Basis")."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..._validation import check_bool, check_float, check_int
from ..bases import GENERATOR_VERSION, check_seed
from ..config import SlimConfig
from ..registry import peft_type_member


@dataclass
class NolaConfig(SlimConfig):
    """NOLA: LoRA's factors A (r x in) and B (out x r) are linear combinations of k and l frozen random bases
    regenerated from a seed; only the k + l mixing coefficients train, per adapted layer, whatever r and the
    layer shape. Use it when adapter storage must be tiny (thousands of parameters per model), e.g. many
    per-user adapters; expect LoRA-level quality on few-shot/small tasks, below LoRA on large data.

    ::

        A = A0 + sum_i a_i U_i,  U_i ~ U(-1, 1) / sqrt(k)   (r x in), A0 ~ U(-1/sqrt(in), 1/sqrt(in)) frozen
        B =      sum_j b_j V_j,  V_j ~ U(-1, 1) / sqrt(l)   (out x r)
        y = W x + (nola_alpha / r) * B A dropout(x)

    a = b = 0 at init, so the output equals the base model; the frozen A0 keeps d/db non-zero. A0, U, V come
    from a counter-based Philox generator seeded from (``seed``, module name): the fused kernels regenerate
    U and V in forward and backward and never store them, and the bases are bit-identical on CPU and GPU.

    Args:
        r (int, default 8): rank of A and B. Costs compute, not parameters.
        num_basis_A (int, default 64): k, the number of random bases (and coefficients) for A.
        num_basis_B (int, default 64): l, the same for B.
        nola_alpha (float, default 8.0): scaling numerator; the update is scaled by nola_alpha / r.
        nola_dropout (float, default 0.0): dropout on the adapter's input.
        seed (int, default 0): seed of all bases, in [0, 2**63 - 1]; saved in adapter_config.json.
        cache_bases (bool, default False): keep the generated bases on the device between steps instead of
            regenerating them (k*r*in + l*out*r numbers per layer, never saved): faster when memory allows,
            e.g. small models or few adapted layers. Off keeps NOLA's "nothing stored" property.
        use_dora (bool, default False): DoRA re-scaling W' = m (W + dW) / ||W + dW||_row on top (+out params).
        dora_eps (float, default 1e-12): rows with ||W + dW|| <= eps keep g = 1 (no NaN on all-zero rows).
        init_weights (bool, default True): False draws non-zero coefficients (tests only).
        generator_version (int, default 2): how bases are drawn from seeds, recorded in adapter_config.json.
            2: Philox (``slimtrain.kernels.philox``). 1: the CPU Mersenne Twister of adapters saved before
            version 2, kept so they reload with their exact bases (drawn on CPU and copied: slower on GPU).
            Other values raise ``ValueError``.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in LoraConfig.
    """

    r: int = field(default=8, metadata={"help": "Rank of the generated A and B."})
    num_basis_A: int = field(default=64, metadata={"help": "k: number of random bases for A."})
    num_basis_B: int = field(default=64, metadata={"help": "l: number of random bases for B."})
    nola_alpha: float = field(default=8.0, metadata={"help": "The update is scaled by nola_alpha / r."})
    nola_dropout: float = field(default=0.0)
    seed: int = field(default=0, metadata={"help": "Seed of the random bases (with the module name)."})
    cache_bases: bool = field(default=False, metadata={"help": "Keep generated bases on the device between steps."})
    use_dora: bool = field(default=False)
    dora_eps: float = field(default=1e-12)
    init_weights: bool = field(default=True)
    generator_version: int = field(default=GENERATOR_VERSION)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """An adapter_config.json without ``seed`` is refused (PEFT calls this on loading): the bases depend on
        it, and the dataclass default would silently load it as seed 0 (logits off by up to 0.16)."""
        if "seed" not in kwargs:
            raise ValueError(
                "Invalid NOLA adapter_config.json: no 'seed' (the bases are generated from it and cannot be "
                "recovered without it; every NOLA config saved by slimtrain records it)"
            )
        return super().check_kwargs(**kwargs)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_member("NOLA")
        check_int("r", self.r, 1)
        check_int("num_basis_A", self.num_basis_A, 1)
        check_int("num_basis_B", self.num_basis_B, 1)
        check_float("nola_alpha", self.nola_alpha, -1e30, 1e30)
        check_float("nola_dropout", self.nola_dropout, 0.0, 1.0, high_open=True)
        check_float("dora_eps", self.dora_eps, 0.0, 1.0)
        check_seed(self.seed)
        check_int("generator_version", self.generator_version, 1, GENERATOR_VERSION)
        check_bool("cache_bases", self.cache_bases)
        self._check_common()
