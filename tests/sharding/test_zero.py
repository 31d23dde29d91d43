"""ZeRO stages 1, 2 and 3 on 2 gloo ranks reach the parameters of a single-process run.

All cases run inside one pair of spawned ranks: launching DeepSpeed, not computing, dominates here.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from . import _zero_worker

deepspeed = pytest.importorskip("deepspeed")

OPTIMIZERS = ["galore", "fira", "frugal", "dct"]
CASES = [{"id": f"{name}-zero{stage}", "optimizer": name, "stage": stage} for stage in (1, 2, 3) for name in OPTIMIZERS]
CASES += [{"id": "galore-zero2-accum2-clip", "optimizer": "galore", "stage": 2, "accum": 2, "clip": 0.5}]
CASES += [{"id": f"{name}-zero{stage}", "optimizer": name, "stage": stage} for stage in (2, 3) for name in ("galore8bit", "dct8bit")]
BF16 = [{"id": f"fira-zero{stage}-bf16", "optimizer": "fira", "stage": stage, "bf16": True} for stage in (1, 2, 3)]
CASES += BF16
SAME_BATCH = [{"id": f"frugal-svd-zero{stage}-same-batch", "optimizer": "frugal-svd", "stage": stage,
               "same_batch": True} for stage in (1, 2)]
CASES += SAME_BATCH


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process(case: dict, world: int = 2) -> tuple[list[torch.Tensor], int]:
    """The same optimizer, data and seed in one process: both ranks' micro-batches in one mean."""
    net = _zero_worker.model()
    opt = _zero_worker.optimizer(case["optimizer"], net)
    accum = case.get("accum", 1)
    for step in range(_zero_worker.STEPS):
        opt.zero_grad()
        for micro in range(accum):
            xs, ys = zip(*(_zero_worker.batch(step, r, micro, case.get("same_batch", False)) for r in range(world)))
            loss = ((net(torch.cat(xs)) - torch.cat(ys)) ** 2).mean() / accum
            loss.backward()
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(net.parameters(), case["clip"])
        opt.step()
    return [p.detach().clone() for p in net.parameters()], opt.state_bytes()


@pytest.fixture(scope="module")
def distributed_results():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_zero_worker.worker, args=(r, 2, port, CASES, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2 * len(CASES)):
        rank, case_id, params, state_bytes, comm = queue.get(timeout=600)
        if case_id == "error":
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} failed:\n{params}")
        results[(rank, case_id)] = (params, state_bytes, comm)
    for p in procs:
        p.join(timeout=60)
    return results


@pytest.mark.parametrize("case", [c for c in CASES if not (c.get("bf16") or c.get("same_batch"))],
                         ids=lambda c: c["id"])
def test_two_ranks_match_single_process(case, distributed_results):
    ref, ref_bytes = single_process(case)
    for rank in range(2):
        params, _, _ = distributed_results[(rank, case["id"])]
        for p, q in zip(ref, map(torch.from_numpy, params)):
            # The all-reduced mean differs from the one-process mean by fp32 rounding. Measured over the 12
            # steps: <= 6e-8 for GaLore, Fira and DCT; 2.3e-6 for FRUGAL, whose Adam part divides by
            # near-zero second moments of a random subspace in its first steps.
            if not case["optimizer"].endswith("8bit"):
                torch.testing.assert_close(q, p, rtol=1e-5, atol=5e-6)
                continue
            # 8-bit moments: where the two means round to either side of a code boundary (a tie within
            # rounding, so whether one occurs depends on the processor's kernels), a moment moves by one code,
            # up to 1.4% of its block's absmax, and the parameters it updates by more than rounding: measured
            # 8.1e-6 on 2 of 480 elements with MKL's processor-independent kernels (MKL_CBWR=COMPATIBLE), none
            # with its kernels for this AMD EPYC. Quantizing on one side only moves them by 7.8e-4.
            off = ~torch.isclose(q, p, rtol=1e-5, atol=5e-6)
            assert off.float().mean() <= 0.05 and (q - p).abs().max() <= 1e-4, (int(off.sum()), (q - p).abs().max())


@pytest.mark.parametrize("case", SAME_BATCH, ids=lambda c: c["id"])
def test_frugal_rounding_noise_stays_rounding_noise(case, distributed_results):
    """FRUGAL with its default SVD projector, the same batch on both ranks: the all-reduced gradient is the
    one-process gradient to fp32 rounding, and so are the weights after 12 steps and three refreshes, now that a
    residual of rounding noise takes no signSGD step and basis rows a refresh chose from noise are dropped.
    Measured: 6.7e-8 (it was 4e-2: noise turned into full lr steps, and a last-bit change picking another
    completion of a rank-deficient gradient's SVD); 1e-6 is a few ulp of these weights (|w| < 1)."""
    ref, _ = single_process(case)
    for rank in range(2):
        params, _, _ = distributed_results[(rank, case["id"])]
        for p, q in zip(ref, map(torch.from_numpy, params)):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c["stage"] == 2 and "accum" not in c], ids=lambda c: c["id"])
def test_state_is_split_across_ranks(case, distributed_results):
    _, ref_bytes = single_process(case)
    per_rank = [distributed_results[(r, case["id"])][1] for r in range(2)]
    # Each rank holds about half: ownership balances matrix sizes, ZeRO splits the element-wise state;
    # per-unit counters are duplicated, hence the slack.
    for b in per_rank:
        assert b < 0.75 * ref_bytes, (per_rank, ref_bytes)
    assert 0.8 * ref_bytes < sum(per_rank) < 1.3 * ref_bytes


@pytest.mark.parametrize("case", BF16, ids=lambda c: c["id"])
def test_bf16_config_trains_close_to_fp32(case, distributed_results):
    """bf16 compute with DeepSpeed's fp32 master weights: the update math is ours and fp32; the
    gradients carry bf16 rounding (8 bits of mantissa), so the weights stay within a few 1e-3."""
    ref, _ = single_process(case)
    params, _, _ = distributed_results[(0, case["id"])]
    for p, q in zip(ref, map(torch.from_numpy, params)):
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        torch.testing.assert_close(q, p, rtol=0, atol=2e-2)
