"""Write the adapter fixtures that ``tests/adapters/test_seeds.py`` loads: one per seed derivation of the
adapters (SHA-256 ``stable_seed`` into Philox or a CPU Mersenne Twister, S²FT's CRC32 selection, RandLoRA's
``seed + 1``), each with a non-zero ``seed``.

Run from the repository root (``python tests/adapters/seed_fixtures/make_seed_adapters.py``) with the code
whose seeds must keep being derived. The files here were written by the code of commit 84746c6, before the
derivations moved to ``slimtrain/_seeds.py``: each holds the adapter's trainable tensors right after
``get_peft_model`` (its seeded init), the same tensors after a seeded perturbation, and the model's output
with them (which reads every seeded basis and selection), computed by that code on an AMD EPYC CPU (there,
that code writes them again byte for byte).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # tests/adapters, for the shared `cases` models

import slimtrain.adapters  # noqa: E402,F401  (registers our methods)
from slimtrain.adapters import LoLDUConfig, NolaConfig, RandLoraConfig, S2FTConfig  # noqa: E402

MLP = ["lin0", "lin1", "lin2"]
S2FT = {"num_heads_per_block": 0, "num_channels_per_block": 5, "seed": 3, "target_modules": ["lin0", "lin1"],
        "module_roles": {"lin0": "ffn_rows", "lin1": "ffn_cols"}}
CASES = {
    "nola-v1": lambda: NolaConfig(target_modules=MLP, r=4, num_basis_A=40, num_basis_B=20, seed=5, generator_version=1),
    "nola-v2": lambda: NolaConfig(target_modules=MLP, r=4, num_basis_A=40, num_basis_B=20, seed=5, generator_version=2),
    "nola-init": lambda: NolaConfig(target_modules=MLP, r=4, num_basis_A=8, num_basis_B=8, seed=5, init_weights=False),
    "randlora-v1": lambda: RandLoraConfig(target_modules=MLP, r=4, randlora_alpha=4.0, seed=3, generator_version=1),
    "randlora-v2": lambda: RandLoraConfig(target_modules=MLP, r=4, randlora_alpha=4.0, seed=3, generator_version=2),
    "randlora-init": lambda: RandLoraConfig(target_modules=MLP, r=4, randlora_alpha=4.0, seed=3, init_weights=False),
    "loldu-init": lambda: LoLDUConfig(target_modules=MLP, r=4, init_weights=False),
    "s2ft-random": lambda: S2FTConfig(**S2FT),
    "s2ft-init": lambda: S2FTConfig(**S2FT, init_weights=False),
}


def run(config) -> dict:
    """What a fixture holds, computed by the code at hand."""
    from peft import get_peft_model

    from cases import MODELS

    tiny = MODELS["mlp"]
    model = get_peft_model(tiny.build(), config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {"init": {n: p.detach().clone() for n, p in trainable.items()}}
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    out["perturbed"] = {n: p.detach().clone() for n, p in trainable.items()}
    with torch.no_grad():
        out["output"] = tiny.output(model(**tiny.batch())).clone()
    return out


def main() -> None:
    for name, config in CASES.items():
        torch.save(run(config()), HERE / f"{name}.pt")


if __name__ == "__main__":
    main()
