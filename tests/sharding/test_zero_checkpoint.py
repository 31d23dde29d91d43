"""DeepSpeed checkpoints hold the slimtrain state: resume is exact, a changed world size is refused,
and a run whose rank is killed restarts from its last checkpoint without loss."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from . import _zero_worker
from .test_zero import _free_port, single_process

deepspeed = pytest.importorskip("deepspeed")


def _spawn(target, world, *args, expect, timeout=600):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = []
    try:
        for _ in range(expect):
            out.append(queue.get(timeout=timeout))
    finally:
        for p in procs:
            p.join(timeout=120)
            if p.is_alive():
                p.kill()
    return out, [p.exitcode for p in procs]


RESUME_RUNS = [("fira", 1), ("fira", 2), ("fira", 3), ("galore8bit", 2)]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zero_ckpt")


@pytest.fixture(scope="module")
def resumed(ckpt_dir):
    out, codes = _spawn(_zero_worker.worker_resume, 2, str(ckpt_dir), RESUME_RUNS, expect=2 * len(RESUME_RUNS))
    errors = [o for o in out if o[1] == "error"]
    assert not errors, errors[0][2]
    assert codes == [0, 0]
    return {(o[0], o[1]): (o[2], o[3]) for o in out}


@pytest.mark.parametrize("name,stage", RESUME_RUNS, ids=[f"{n}-zero{s}" for n, s in RESUME_RUNS])
def test_resume_from_deepspeed_checkpoint_is_exact(name, stage, resumed):
    for rank in range(2):
        full, again = resumed[(rank, f"{name}-zero{stage}")]
        for a, b in zip(full, again):
            assert (a == b).all()  # bit for bit: same state, same arithmetic


def test_checkpoint_on_other_world_size_is_refused(resumed, ckpt_dir):
    out, _ = _spawn(_zero_worker.worker_reshard, 1, str(ckpt_dir), expect=1)
    message = out[0][1]
    # DeepSpeed refuses first (it cannot re-partition ZeRO state); our load_state_dict refuses with its
    # own message where DeepSpeed lets a mismatch through. Either way: an error naming both sizes.
    deepspeed_refusal = message.startswith("ZeRORuntimeException") and "DP world size of 2" in message and "current world size is 1" in message
    our_refusal = message.startswith("RuntimeError") and "saved with 2 ranks" in message and "1 ranks at stage 2 now" in message
    assert deepspeed_refusal or our_refusal, message


def test_killed_rank_fails_cleanly_and_restart_loses_nothing(tmp_path):
    ckpt = str(tmp_path / "killed")
    out, codes = _spawn(_zero_worker.worker_killed, 2, ckpt, expect=0)
    # Rank 1 died by SIGKILL; rank 0 must not hang: gloo reports the lost peer within its timeout and
    # the process exits with an error instead of finishing.
    assert codes[1] == -9, codes
    assert codes[0] not in (None, 0), codes
    out, codes = _spawn(_zero_worker.worker_restart, 2, ckpt, expect=2)
    assert codes == [0, 0], out
    ref, _ = single_process({"optimizer": "galore"})
    for rank, start, params in out:
        assert start == 8  # the newest checkpoint before the kill
        for p, q in zip(ref, map(torch.from_numpy, params)):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=5e-6)
