"""Data-parallel wrappers on 2 gloo CPU ranks: what is supported matches one process, what is not is
refused when the optimizer is built.

All scenarios run inside one pair of spawned ranks (starting them dominates the time).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from . import _distributed_worker

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    names = list(_distributed_worker.SCENARIOS)
    port = _free_port()
    procs = [ctx.Process(target=_distributed_worker.worker, args=(r, WORLD, port, names, queue))
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




def single_process(accum: int = 1) -> list[torch.Tensor]:
    """The same optimizer stepped normally in one process on both ranks' micro-batches (one mean)."""
    model = _distributed_worker.mlp()
    opt = _distributed_worker.optimizer(model)
    for step in range(_distributed_worker.STEPS):
        opt.zero_grad()
        for micro in range(accum):
            xs, ys = zip(*(_distributed_worker.batch(step, r, micro) for r in range(WORLD)))
            (((model(torch.cat(xs)) - torch.cat(ys)) ** 2).mean() / accum).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("scenario,accum", [("ddp_layerwise", 1), ("ddp_layerwise_accum", 2)])
def test_layerwise_under_ddp_matches_single_process(ranks, scenario, accum):
    ref = single_process(accum)
    start = [p.detach() for p in _distributed_worker.mlp().parameters()]
    for rank in range(WORLD):
        for p, q, p0 in zip(ref, map(torch.from_numpy, ranks[(rank, scenario)]), start):
            # DDP averages per-rank means, one process takes one mean: fp32 rounding carried through 8
            # Adam steps and a refresh. Measured 6e-8 (one micro-batch) and 7.5e-7 (two); stepping on each rank's
            # local gradient instead of the average ends 6e-2 away.
            torch.testing.assert_close(q, p, rtol=1e-5, atol=5e-6)
            assert not torch.equal(q, p0)


def test_layerwise_refuses_what_it_cannot_run(ranks):
    for rank in range(WORLD):
        m = ranks[(rank, "layerwise_refusals")]
        assert m["no_model"] and "model=ddp_model" in m["no_model"] and "local gradient" in m["no_model"]
        assert m["not_ddp"] and ("takes a torch.nn.parallel.DistributedDataParallel model or an FSDP2 (fully_shard) "
                                 "model, got Sequential") in m["not_ddp"]
        assert m["accumulation"] and "no_sync()" in m["accumulation"]
        assert m["unused"] and "find_unused_parameters=True" in m["unused"]


def test_layerwise_under_ddp_follows_add_param_group_and_refuses_unaveraged_gradients(ranks):
    for rank in range(WORLD):
        result = ranks[(rank, "ddp_layerwise_added_group")]
        assert result["equal"], "layer-wise under DDP differs from DDP with a regular step after add_param_group"
        assert result["unaveraged"] and "DistributedDataParallel does not average (shapes [(8, 16)])" in \
            result["unaveraged"]
