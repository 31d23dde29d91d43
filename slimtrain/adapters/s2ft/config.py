"""Configuration of S²FT, structured sparse fine-tuning (Yang et al., NeurIPS 2024, arXiv 2412.06289)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..._validation import check_choice, check_int
from ..bases import check_seed
from ..config import SlimConfig
from ..registry import peft_type_member

SELECTIONS = ("random", "weight_norm")
ROLES = ("attn_rows", "attn_cols", "ffn_rows", "ffn_cols")
_BIAS_CHOICES = ("none", "all", "s2ft_only")

# Module-name suffix -> role. The longest matching suffix wins, so "attention.output.dense" (BERT's o) is not
# taken for "output.dense" (BERT's down). GPT-2's fused c_attn has no entry: its v rows share one matrix with q, k.
DEFAULT_ROLES = {
    # LLaMA / Mistral / Qwen2 style
    "v_proj": "attn_rows",
    "o_proj": "attn_cols",
    "up_proj": "ffn_rows",
    "gate_proj": "ffn_rows",
    "down_proj": "ffn_cols",
    # BERT / RoBERTa style
    "attention.self.value": "attn_rows",
    "attention.output.dense": "attn_cols",
    "intermediate.dense": "ffn_rows",
    "output.dense": "ffn_cols",
    # GPT-2 style (Conv1D)
    "attn.c_proj": "attn_cols",
    "mlp.c_fc": "ffn_rows",
    "mlp.c_proj": "ffn_cols",
}


@dataclass
class S2FTConfig(SlimConfig):
    """Configuration of an [`S2FTModel`]: S²FT, Structured Sparse Fine-Tuning (Yang et al., NeurIPS 2024).

    Not to be confused with the unrelated CVPR-2026 "S2FT" (PEFT in the sparse spectrum domain).

    Per transformer block S²FT selects a few attention heads and FFN channels and trains dense blocks over
    exactly those rows/columns of the coupled weights, in the ORIGINAL weight layout (no permutation):

    - attention: each selected **KV head** ``k`` trains rows ``k·hd:(k+1)·hd`` of ``v`` (``attn_rows``) and the
      columns of ``o`` (``attn_cols``) that read the outputs of *all* query heads in its group,
      ``q ∈ [k·n_rep, (k+1)·n_rep)`` with ``n_rep = num_attention_heads / num_key_value_heads`` (GQA);
    - FFN: each selected channel ``c`` trains row ``c`` of ``up`` and ``gate`` (``ffn_rows``) and column ``c`` of
      ``down`` (``ffn_cols``).

    Every adapted weight gets ``W' = W + ΔW`` with ``ΔW`` zero outside the selected rows (or columns); the dense
    block starts at zero, so the model equals the base model at init. The indices are int64 buffers saved with
    the adapter. Trainable parameters per block::

        (|v targeted| + n_rep·|o targeted|)·k·hd·hidden + (|up|+|gate|+|down| targeted)·c·hidden

    for ``k = num_heads_per_block`` and ``c = num_channels_per_block``.

    Args:
        num_heads_per_block (`int`, defaults to 1): KV heads selected per block (= heads without GQA).
        num_channels_per_block (`int`, defaults to 8): FFN channels selected per block.
        selection (`str`, defaults to "random"): "random" (seeded by ``seed`` and a CRC32 of the block name,
            as the paper's uniform selection) or "weight_norm" (largest summed squared norm of the coupled
            rows/columns of the targeted weights).
        seed (`int`, defaults to 0): seed of the random selection, in [0, 2**63 - 1].
        target_modules (`list[str] | str`): names (suffix match) or a regex (full match) of the modules to adapt;
            every one must resolve to a role through ``module_roles``.
        module_roles (`dict[str, str]`, optional): module-name suffix -> role, one of ``ROLES``; defaults to
            ``DEFAULT_ROLES`` (LLaMA-, BERT- and GPT-2-style names).
        num_attention_heads / num_key_value_heads / head_dim (`int`, optional): head geometry; read from the
            model config when omitted.
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save, bias: as in PEFT's LoRA
            (bias in "none", "all", "s2ft_only").
        init_weights (`bool`, defaults to True): ``False`` starts the blocks at small random values (tests only).
    """

    num_heads_per_block: int = field(default=1, metadata={"help": "KV heads selected per block."})
    num_channels_per_block: int = field(default=8, metadata={"help": "FFN channels selected per block."})
    selection: str = field(default="random", metadata={"help": f"One of {SELECTIONS}."})
    seed: int = field(default=0, metadata={"help": "Seed of the random selection."})
    module_roles: Optional[dict[str, str]] = field(
        default=None, metadata={"help": f"Module-name suffix -> role in {ROLES}; default DEFAULT_ROLES."}
    )
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Query heads (from model config)."})
    num_key_value_heads: Optional[int] = field(default=None, metadata={"help": "KV heads (from model config)."})
    head_dim: Optional[int] = field(default=None, metadata={"help": "Head size (from model config)."})
    bias: str = field(default="none", metadata={"help": "'none', 'all' or 's2ft_only'."})
    init_weights: bool = field(default=True, metadata={"help": "False: random blocks at init (tests only)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type_member("S2FT")
        check_int("num_heads_per_block", self.num_heads_per_block, 0)
        check_int("num_channels_per_block", self.num_channels_per_block, 0)
        if self.num_heads_per_block == 0 and self.num_channels_per_block == 0:
            raise ValueError(
                "Invalid num_heads_per_block=0 and num_channels_per_block=0 (expected at least one of them >= 1)"
            )
        check_choice("selection", self.selection, SELECTIONS)
        check_seed(self.seed)
        for name in ("num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.module_roles is not None:
            for suffix, role in self.module_roles.items():
                check_choice(f"module_roles[{suffix!r}]", role, ROLES)
        check_choice("bias", self.bias, _BIAS_CHOICES)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("Invalid layers_pattern: it is only used together with layers_to_transform.")
        self._check_common()

    @property
    def roles(self) -> dict[str, str]:
        return dict(self.module_roles) if self.module_roles is not None else dict(DEFAULT_ROLES)
