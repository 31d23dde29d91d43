"""Data-parallel wrappers on 2 gloo CPU ranks: what is supported matches one process, what is not is
refused when the optimizer is built.

All scenarios run inside one pair of spawned ranks (starting them dominates the time).
"""

from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp

from . import _distributed_worker as W

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    names = list(W.SCENARIOS)
    port = _free_port()
    procs = [ctx.Process(target=W.worker, args=(r, WORLD, port, names, queue))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(WORLD * len(names)):
            rank, name, value = queue.get(timeout=300)
            if name == "error":
                pytest.fail(f"rank {rank} failed:\n{value}")
            results[(rank, name)] = value
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return results




def test_fsdp2_parameters_refused_when_built(ranks):
    for rank in range(WORLD):
        result = ranks[(rank, "fsdp2_refused")]
        assert result["message"] is not None, "GaLoreAdamW accepted FSDP2 DTensor parameters"
        assert "DTensor" in result["message"] and "slimtrain.sharding.initialize" in result["message"]
        assert "DistributedDataParallel" in result["message"]
        assert result["unchanged"]
