"""LLaMA shapes by name, and the transformers configs and meta-device models built from them.

The one table of model shapes in the package: the memory calculator (``slimtrain memory 7B``), the
recipes (``--model tiny``, ``--model 1b``) and the benchmarks read it from here.

- :data:`LLAMA_SHAPES`: the GaLore paper's C4 runs (its ``configs/llama_*.json``), 60M to 7B, with the
  paper's 32,000-token vocabulary (:data:`LLAMA_VOCAB`) and an untied head;
- :data:`CPU_SHAPES`: ``tiny`` (1.9M parameters with a byte vocabulary) trains on two CPU cores in
  minutes, ``small`` is the next step up.

A shape is ``(hidden_size, intermediate_size, num_attention_heads, num_hidden_layers)``; the vocabulary
is the tokenizer's, given when the config is built.
"""

from __future__ import annotations

import json
import os

import torch

Shape = tuple[int, int, int, int]  # hidden_size, intermediate_size, num_attention_heads, num_hidden_layers

LLAMA_SHAPES: dict[str, Shape] = {
    "60M": (512, 1376, 8, 8),
    "130M": (768, 2048, 12, 12),
    "350M": (1024, 2736, 16, 24),
    "1B": (2048, 5461, 32, 24),
    "7B": (4096, 11008, 32, 32),
}
LLAMA_VOCAB = 32000
CPU_SHAPES: dict[str, Shape] = {
    "tiny": (192, 512, 6, 4),
    "small": (256, 688, 4, 6),
}


def llama_from_shape(shape: Shape, vocab_size: int = LLAMA_VOCAB, **overrides):
    """A ``LlamaConfig`` from ``(hidden, intermediate, heads, layers)``, untied ``lm_head`` as in GaLore's
    configs; ``overrides`` go to ``LlamaConfig`` (e.g. ``max_position_embeddings``)."""
    from transformers import LlamaConfig

    hidden, intermediate, heads, layers = shape
    return LlamaConfig(
        **{
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "num_hidden_layers": layers,
            "tie_word_embeddings": False,
            **overrides,
        }
    )


def llama_config(name: str):
    """The ``LlamaConfig`` of a size of :data:`LLAMA_SHAPES` (case-insensitive: ``"7b"`` works)."""
    key = name.upper()
    if key not in LLAMA_SHAPES:
        raise ValueError(f"Invalid model: {name!r} (expected one of {', '.join(LLAMA_SHAPES)} or a config.json path)")
    return llama_from_shape(LLAMA_SHAPES[key])


def load_config(config_or_name):
    """A transformers config from a size name, a ``config.json`` path (or its folder), or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_name, PretrainedConfig):
        return config_or_name
    if not isinstance(config_or_name, str):
        raise ValueError(f"Invalid model: {config_or_name!r} (expected a size name, a config.json path or a config)")
    if config_or_name.upper() in LLAMA_SHAPES:
        return llama_config(config_or_name)
    path = config_or_name
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"Invalid model: {config_or_name!r} (expected one of {', '.join(LLAMA_SHAPES)} or an existing config.json path)"
        )
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"Invalid model: {path} is not JSON ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"Invalid model: {path} has no 'model_type' (expected a transformers config.json)")
    raw = dict(raw)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


def meta_model(config) -> torch.nn.Module:
    """The causal LM for ``config`` on the meta device: shapes only, no memory, any size."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
