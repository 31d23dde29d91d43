"""Write the checkpoints that ``test_load_checks.py::test_checkpoint_recording_its_method_resumes`` loads.

Run from the repository root (``python -m tests.optimizers.data.identity.make_identity_checkpoints``) with the
code whose checkpoint format must keep loading. These state dicts record their writer (``"slimtrain"``:
``method`` and, for FRUGAL, ``mode``) and hold the param-group keys of the code that wrote them (a
``projector`` in every group, SST's and FRUGAL block mode's included); each file holds the model and
optimizer after 7 steps of ``helpers.train`` and the parameters 11 steps later, computed on CPU.
"""

from __future__ import annotations

from pathlib import Path

from .. import make_checkpoints

HERE = Path(__file__).parent
CASES = {name: make_checkpoints.CASES[name] for name in ("frugal-block", "sst", "galore8bit-svd-sr", "fira8bit")}


def main() -> None:
    make_checkpoints.write_all(CASES, HERE)


if __name__ == "__main__":
    main()
