"""LLaMA-shaped models for the pretrain recipe and the benchmarks, by the names ``--model`` takes.

The shapes are :mod:`slimtrain.models`'s: ``tiny`` and ``small`` for the CPU, ``60m`` ... ``1b`` from the
GaLore paper's C4 runs. The vocabulary is the tokenizer's (256 for bytes), so parameter counts are below
the paper's 32k-vocabulary ones.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..models import CPU_SHAPES, LLAMA_SHAPES, Shape, llama_from_shape

# --model name -> shape: the CPU shapes, and the paper's sizes of its Table 2 (60M to 1B); 7B is the memory
# calculator's only.
MODEL_SHAPES: dict[str, Shape] = {
    **CPU_SHAPES,
    **{name.lower(): shape for name, shape in LLAMA_SHAPES.items() if name != "7B"},
}


def model_config(name: str, vocab_size: int, max_seq_len: int = 1024) -> LlamaConfig:
    """The ``LlamaConfig`` for a named shape. Raises ``ValueError`` naming the allowed shapes."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"Invalid --model: {name!r} (expected one of {', '.join(MODEL_SHAPES)})")
    return llama_from_shape(
        MODEL_SHAPES[name],
        vocab_size,
        max_position_embeddings=max_seq_len,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def smallest_matrix_dim(config: LlamaConfig) -> int:
    """min(m, n) over the attention and MLP weight matrices: the largest rank a projector can have."""
    head_dim = config.hidden_size // config.num_attention_heads
    return min(config.hidden_size, config.intermediate_size, config.num_key_value_heads * head_dim)


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model in fp32; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()
