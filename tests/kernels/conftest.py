"""Shared fixtures for the kernel tests: run the Triton path (compiled on CUDA, interpreted on CPU) and
poison every buffer a launcher allocates, so an element a kernel forgets to write fails the test."""

from __future__ import annotations

import pytest
import torch

from slimtrain import kernels

from .._device import DEVICE  # noqa: F401  (re-exported: the kernel tests import it from here)

pytest.importorskip("triton")

INT_POISON = 0x5A  # not special in any code map: an unwritten code shows up as a wrong value


@pytest.fixture
def triton_backend():
    with kernels.use_backend("triton"):
        yield


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan") if t.is_floating_point() else INT_POISON)


@pytest.fixture
def poison(monkeypatch):
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled (integers: 0x5A-filled) tensors for the
    duration of a test, so outputs the kernels allocate start poisoned rather than holding stale memory
    that might happen to be right."""
    empty, empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poisoned(empty_like(*a, **k)))
