"""Write the checkpoints that ``tests/optimizers/test_seeds.py`` loads: one per seed derivation of the
optimizers, each with a non-zero base ``seed`` so that every multiplier matters.

Run from the repository root (``python -m tests.optimizers.data.seeds.make_seed_checkpoints``) with the code
whose seeds must keep being derived. The files here were written by the code of commit 84746c6, before the
derivations moved to ``slimtrain/_seeds.py``, on an AMD EPYC CPU with two threads (``OMP_NUM_THREADS=2``; that
code and those settings write them again byte for byte): each ``<name>.pt`` holds the model and optimizer after
7 steps of ``helpers.train`` and the parameters 11 steps later; ``decisions.json`` holds, for each of these 18
steps, the sampled decisions in the optimizer's state after it (:func:`decisions`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimtrain.optimizers import FrugalAdamW, GaLoreAdamW, SSTAdamW

from ...helpers import groups, mlp, train, write_checkpoint

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


# The state entries an optimizer draws rather than computes: FRUGAL's active matrices, SST's sampled vectors.
DECISION_KEYS = ("active", "sst_idx")


def decisions(opt) -> dict[str, dict[str, list]]:
    """The sampled decisions in ``opt``'s state, ``{parameter index: {key: value}}`` (JSON's string keys)."""
    return {str(i): {k: st[k].tolist() for k in DECISION_KEYS if k in st}
            for i, st in opt.state_dict()["state"].items() if any(k in st for k in DECISION_KEYS)}


def train_deciding(model, opt, steps: int, start: int = 0) -> list[dict]:
    """``helpers.train(model, opt, steps, start=start)`` one step at a time: the :func:`decisions` after each step."""
    made = []
    for step in range(start, start + steps):
        train(model, opt, steps=1, start=step)
        made.append(decisions(opt))
    return made


def main() -> None:
    made = {}
    for name, (dtype, factory) in CASES.items():
        write_checkpoint(HERE / f"{name}.pt", factory, dtype)
        model = mlp(dtype=dtype)  # the same 18 steps again, recording: the same run, step for step
        made[name] = train_deciding(model, factory(groups(model)), steps=18)
    lines = [f"{json.dumps(name)}: {json.dumps(made[name], sort_keys=True)}" for name in sorted(made)]
    (HERE / "decisions.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one case a line


if __name__ == "__main__":
    main()
