"""Adapter presets: the PEFT config each method name stands for, and the learning rate it trains with.

One table, :data:`PRESETS`, read by the finetune recipe (its ``--adapter`` choices and default ``--lr``)
and the fine-tuning benchmark. A preset turns a rank ``r`` and a seed into a config:

- ``nola``: NOLA at rank ``r`` over 64 + 64 random bases; ``randlora``: RandLoRA at rank ``4r``,
  ``randlora_alpha = 8r``; ``dora``, ``loldu``: rank ``r``; ``s2ft``: S2FT's default selection (it takes
  no rank) on the value and output projections; ``lora``: PEFT's LoRA, ``lora_alpha = 2r``;
- ``lora-dora`` (PEFT's LoRA with ``use_dora=True``) and ``peft-randlora`` (PEFT's RandLora) are the peers
  the benchmark compares ours with; the command line does not offer them (``Preset.command_line``).

Learning rates are for a few hundred steps with a fresh classification head: methods that train only
coefficients (NOLA, LoLDU's diagonal) need larger steps than LoRA's matrices; S2FT updates blocks of the
pretrained weights directly and needs smaller ones.

Where an adapter goes is found by name (:data:`TARGET_SETS`, :func:`find_targets`): the attention's query
and value projections of BERT-like, LLaMA-like and DistilBERT models, or S2FT's value and output ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import peft

from .dora import DoraConfig
from .loldu import LoLDUConfig
from .nola import NolaConfig
from .randlora import RandLoraConfig
from .s2ft import S2FTConfig


@dataclass(frozen=True)
class Preset:
    """A method's config class, its arguments as a function of ``(r, seed)``, and its learning rate."""

    config_class: type[peft.PeftConfig]
    arguments: Callable[[int, int], dict]
    lr: float
    targets: str = "attention"  # which projections of a TARGET_SETS row: "attention" or "s2ft"
    command_line: bool = True  # offered by `slimtrain finetune --adapter`


PRESETS: dict[str, Preset] = {
    "nola": Preset(NolaConfig, lambda r, seed: dict(r=r, num_basis_A=64, num_basis_B=64, seed=seed), lr=1e-2),
    "randlora": Preset(RandLoraConfig, lambda r, seed: dict(r=4 * r, randlora_alpha=8 * r, seed=seed), lr=2e-3),
    "dora": Preset(DoraConfig, lambda r, seed: dict(r=r), lr=2e-3),
    "loldu": Preset(LoLDUConfig, lambda r, seed: dict(r=r), lr=1e-2),
    "s2ft": Preset(S2FTConfig, lambda r, seed: dict(seed=seed), lr=5e-4, targets="s2ft"),
    "lora": Preset(peft.LoraConfig, lambda r, seed: dict(r=r, lora_alpha=2 * r), lr=2e-3),
    "lora-dora": Preset(peft.LoraConfig, lambda r, seed: dict(r=r, lora_alpha=2 * r, use_dora=True), lr=2e-3,
                        command_line=False),
    "peft-randlora": Preset(peft.RandLoraConfig,
                            lambda r, seed: dict(r=4 * r, randlora_alpha=8 * r, projection_prng_key=seed), lr=2e-3,
                            command_line=False),
}
COMMAND_LINE = tuple(name for name, preset in PRESETS.items() if preset.command_line)

# Linear layers' names per model family: {"attention": query and value projections, "s2ft": value and output
# projections}. BERT-like (BERT, MiniLM, RoBERTa, ELECTRA), LLaMA-like (LLaMA, Mistral, Qwen, ...), DistilBERT.
TARGET_SETS: tuple[dict[str, tuple[str, ...]], ...] = (
    {"attention": ("query", "value"), "s2ft": ("attention.self.value", "attention.output.dense")},
    {"attention": ("q_proj", "v_proj"), "s2ft": ("v_proj", "o_proj")},
    {"attention": ("q_lin", "v_lin"), "s2ft": ("v_lin", "out_lin")},
)


def check_name(name: str, allowed: tuple[str, ...] = COMMAND_LINE) -> Preset:
    """The preset called ``name``; ``ValueError`` naming the allowed ones otherwise."""
    if name not in allowed or name not in PRESETS:
        raise ValueError(f"Invalid --adapter: {name!r} (expected one of {', '.join(allowed)})")
    return PRESETS[name]


def find_targets(name: str, module_names: list[str]) -> list[str] | None:
    """The target modules of preset ``name`` in a model whose Linear layers are ``module_names``: the
    first row of :data:`TARGET_SETS` the model has every name of (as a whole name or a dotted suffix)."""
    kind = PRESETS[name].targets
    for row in TARGET_SETS:
        if all(any(n == w or n.endswith("." + w) for n in module_names) for w in row[kind]):
            return list(row[kind])
    return None


def adapter_config(name: str, rank: int, seed: int = 0, targets: list[str] | None = None, **kwargs) -> peft.PeftConfig:
    """The PEFT config of preset ``name`` at rank ``rank`` on ``targets`` (default: BERT's names, the first
    row of :data:`TARGET_SETS`); ``kwargs`` go to the config (e.g. ``task_type="SEQ_CLS"``)."""
    preset = check_name(name, tuple(PRESETS))
    targets = list(TARGET_SETS[0][preset.targets]) if targets is None else list(targets)
    return preset.config_class(target_modules=targets, **preset.arguments(rank, seed), **kwargs)
