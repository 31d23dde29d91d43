"""Write the checkpoints that ``test_state_dict.py::test_checkpoint_of_earlier_version_resumes`` loads.

Run from the repository root (``python -m tests.optimizers.data.make_checkpoints``) with the code whose
checkpoint format must keep loading. The files in this folder were written at commit e556968 (before
state dicts recorded their method), on an AMD EPYC CPU with two threads (``OMP_NUM_THREADS=2``; that code
and those settings write them again byte for byte): each holds the model and optimizer after 7 steps of
``helpers.train`` and the parameters 11 steps later.
"""

from __future__ import annotations

from pathlib import Path

from slimtrain.optimizers import FiraAdamW8bit

from ..helpers import CONFIGS, write_checkpoint

HERE = Path(__file__).parent
# One row per class (and the random projector's seed state); FiraAdamW8bit has no CONFIGS row.
CASES = {name: factory for name, factory in CONFIGS if name in {
    "galore-svd", "galore-random", "fira-svd", "frugal-svd", "frugal-block", "dct", "sst",
    "galore8bit-svd-sr", "dct8bit-rotate", "frugal8bit-columns-reset", "sst8bit",
}}
CASES["fira8bit"] = lambda g: FiraAdamW8bit(g, lr=1e-2, min_8bit_size=0)


def write_all(cases: dict, folder: Path) -> None:
    for name, factory in cases.items():
        write_checkpoint(folder / f"{name}.pt", factory)


def main() -> None:
    write_all(CASES, HERE)


if __name__ == "__main__":
    main()
