"""The device under test, decided in one place for every test of the kernels, of the optimizers on the
kernels and of the adapters' kernel paths: CUDA when present, else the CPU, where Triton runs in its
interpreter (``tests/conftest.py`` turns it on before anything imports Triton).

A test that forces the Triton backend builds its tensors on :data:`DEVICE`; a check that only a GPU can
give (a kernel compiled for the device, bases compared across devices, host synchronizations) is marked
:data:`needs_gpu`.
"""

from __future__ import annotations

import pytest
import torch

from slimtrain.kernels._triton import HAS_TRITON, interpreting

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: checks the Triton interpreter cannot give")
needs_triton = pytest.mark.skipif(
    not (HAS_TRITON and (ON_GPU or interpreting())),
    reason="needs Triton, compiled on a CUDA GPU or in its interpreter (TRITON_INTERPRET=1)",
)


def gpu_name() -> str:
    """The GPU's name, or ``"cpu (Triton interpreter)"``: for skip reasons and result headers."""
    return torch.cuda.get_device_name(DEVICE) if ON_GPU else "cpu (Triton interpreter)"
