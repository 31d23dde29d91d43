"""Leaving ``torch.distributed``'s process groups at the end of a run."""

from __future__ import annotations

import gc

import torch.distributed as dist


def leave_process_group() -> None:
    """Free what still refers to the groups, wait for every rank, then destroy the groups.

    A gloo collective (a ``Work``, holding tensors) that outlives ``destroy_process_group`` is freed during the
    interpreter's teardown, where releasing its tensors aborts the process ("terminate called without an active
    exception") after a finished run. FSDP2's state and a DeepSpeed engine hold such collectives inside reference
    cycles, so drop your references to the model and optimizer first; the garbage collection here then frees them
    while Python is alive. Call it on every rank."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
