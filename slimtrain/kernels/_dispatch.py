"""Which implementation of a fused op runs: the Triton kernel or its torch reference.

Rule: Triton for CUDA tensors when Triton imports, the torch reference everywhere else (CPU, MPS, no
Triton). The user can force either, for the whole process or a block::

    SLIMTRAIN_KERNELS=torch python train.py          # environment: auto (default), torch, triton
    slimtrain.kernels.set_backend("torch")           # process-wide
    with slimtrain.kernels.use_backend("torch"): ... # one block (thread-local)

Forcing ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before Python starts (Triton
reads it when the kernels are defined); that is how the tests run every kernel on CPU.

The choice is never silent: the first time an op runs with a backend on a device type, one INFO line
goes to the ``slimtrain.kernels`` logger, and :func:`backends_used` returns every (op, device) ->
backend pair seen so far.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import _triton

logger = logging.getLogger("slimtrain.kernels")

BACKENDS = ("auto", "torch", "triton")
_ENV = "SLIMTRAIN_KERNELS"


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"Invalid {source}: {name!r} (expected one of {', '.join(map(repr, BACKENDS))})")
    return name


_process_backend = _check_backend(os.environ.get(_ENV, "auto"), f"{_ENV} environment variable")
_local = threading.local()
_seen: dict[tuple[str, str], str] = {}


def set_backend(name: str) -> None:
    """Choose the backend for the whole process: ``"auto"``, ``"torch"`` or ``"triton"``."""
    global _process_backend
    _process_backend = _check_backend(name, "backend")


def get_backend() -> str:
    """The backend setting in force here (``"auto"``, ``"torch"`` or ``"triton"``)."""
    return getattr(_local, "backend", None) or _process_backend


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (this thread only)."""
    _check_backend(name, "backend")
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def choose(op: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for running ``op`` on tensors on ``device``; logs a new choice."""
    setting = get_backend()
    if setting == "torch":
        backend = "torch"
    elif setting == "triton":
        _triton.require(device, op)
        backend = "triton"
    else:
        backend = "triton" if device.type == "cuda" and _triton.available() else "torch"
    key = (op, device.type)
    if _seen.get(key) != backend:
        _seen[key] = backend
        logger.info("slimtrain.kernels: %s on %s runs the %s implementation (setting %r)", op, device.type,
                    backend, setting)
    return backend


def backends_used() -> dict[tuple[str, str], str]:
    """Every ``(op, device type) -> backend`` chosen so far in this process (the last choice of each)."""
    return dict(_seen)
