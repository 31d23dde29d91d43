"""One torchrun launch per world size for every FSDP2 test of this folder (starting ranks dominates the time)."""

from __future__ import annotations

import pytest

from . import _fsdp_worker as W
from ._fsdp_harness import run_cases

#: The cases of ``_fsdp_worker.py`` each world size runs (tests/sharding/test_fsdp*.py read them).
CASES = {
    2: ["matrix_ops", "traffic_adamw", "refusals", "nonfinite_on_one_rank", *(f"exact-{n}" for n in W.config_names()),
        *(f"exact-rows-{n}" for n in W.EXACT_ROWS), *(f"dcp-{n}" for n in W.DCP_ROWS),
        *(f"accelerate-{n}" for n in W.ACCELERATE_ROWS), *(f"layerwise-{n}-accum{a}" for n, a in W.LAYERWISE_ROWS),
        *(f"mixed-{n}" for n in W.MIXED_ROWS)],
    3: ["matrix_ops", "traffic_adamw", *(f"exact-{n}" for n in W.config_names()), *(f"dcp-{n}" for n in W.DCP_ROWS),
        *(f"mixed-{n}" for n in W.MIXED_ROWS),
        *(f"layerwise-{n}-accum{a}" for n, a in W.LAYERWISE_ROWS)],
}


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """A folder both launches see (the 3-rank one loads a checkpoint the 2-rank one wrote)."""
    return tmp_path_factory.mktemp("fsdp-shared")


@pytest.fixture(scope="session")
def ranks(shared):
    """``{world: {(rank, case): result}}`` for 2 and 3 ranks, 2 first."""
    pytest.importorskip("torch.distributed.fsdp")
    env = {"SLIMTRAIN_FSDP_SHARED": str(shared)}
    return {world: run_cases(world, CASES[world], timeout=900, env=env) for world in (2, 3)}
