"""Triton, if it is installed: the one place that imports it, so every kernel module can be imported
(and its torch reference used) on a machine without Triton.

Kernel modules write ``if _triton.HAS_TRITON:`` around their ``@triton.jit`` definitions. Triton
decides at definition time whether a kernel runs compiled or in its CPU interpreter, from the
``TRITON_INTERPRET`` environment variable; :func:`interpreting` reports that choice.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch on Linux; the CPU wheel and macOS have none.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is in the dev extra
    triton = None
    tl = None

HAS_TRITON = triton is not None


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter, on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Whether compiled Triton kernels can run here (Triton installed and a CUDA device present)."""
    return HAS_TRITON and not interpreting() and torch.cuda.is_available()


def require(device: torch.device, op: str) -> None:
    """Raise a clear error unless a forced Triton run of ``op`` on ``device`` can work."""
    if not HAS_TRITON:
        raise ImportError(f"The Triton backend for {op} needs Triton: pip install 'slimtrain[triton]'")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"The Triton backend for {op} got CPU tensors but Triton is not in interpreter mode: set "
            "TRITON_INTERPRET=1 in the environment before Python starts, or use the torch backend"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"The Triton backend for {op} does not run on {device.type} tensors; use the torch backend")


def tile(interpreted, compiled):
    """A block size (or a dict of them): large under the interpreter, which runs one program at a time
    (about 2 ms each), the tuned value when compiled."""
    return interpreted if interpreting() else compiled


# The one tile of the matmul kernels under the interpreter, where there is no device to autotune on
# (tl.dot needs every dimension >= 16).
INTERPRETED_MATMUL_TILE = {"BM": 32, "BN": 32, "BK": 16}


def matmul_precision() -> str:
    """``tl.dot``'s input precision for fp32 operands, by torch's own rule for fp32 matmuls, so a fused
    kernel is as exact as the torch code it replaces."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
