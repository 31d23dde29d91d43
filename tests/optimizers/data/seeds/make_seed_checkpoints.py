"""Write the checkpoints that ``tests/optimizers/test_seeds.py`` loads: one per seed derivation of the
optimizers, each with a non-zero base ``seed`` so that every multiplier matters.

Run from the repository root (``python -m tests.optimizers.data.seeds.make_seed_checkpoints``) with the code
whose seeds must keep being derived. The files here were written by the code of commit 84746c6, before the
derivations moved to ``slimtrain/_seeds.py``: each holds the model and optimizer after 7 steps of ``helpers.train``
and the parameters 11 steps later, computed by that code on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimtrain.optimizers import FrugalAdamW, GaLoreAdamW, SSTAdamW

from ...helpers import write_checkpoint

HERE = Path(__file__).parent
SEED = 12345
# (name, model dtype, factory): the derivations each one exercises.
CASES = {
    # parameter seeds (seed, index) and the random projector's refresh streams (proj_seed, refresh)
    "galore-random": (torch.float32, lambda g: GaLoreAdamW(g, lr=1e-2, projector="random", seed=SEED)),
    # the randomized range finder's refresh streams
    "galore-randomized": (torch.float32, lambda g: GaLoreAdamW(g, lr=1e-2, projector="randomized", seed=SEED)),
    # FRUGAL's random block order (seed, refresh index)
    "frugal-block-random": (torch.float32, lambda g: FrugalAdamW(g, lr=1e-2, mode="block", density=0.5,
                                                                 block_order="random", seed=SEED)),
    # SST's parameter seeds and draws (sst_seed, draw)
    "sst": (torch.float32, lambda g: SSTAdamW(g, lr=1e-2, seed=SEED)),
    # stochastic rounding's streams (sr_seed, sr_step) on bf16 weights
    "galore-bf16-sr": (torch.bfloat16, lambda g: GaLoreAdamW(g, lr=1e-2, bf16_stochastic_round=True, seed=SEED)),
}


def main() -> None:
    for name, (dtype, factory) in CASES.items():
        write_checkpoint(HERE / f"{name}.pt", factory, dtype)


if __name__ == "__main__":
    main()
