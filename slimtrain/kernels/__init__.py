"""Fused Triton kernels for the hot paths, each beside the torch reference that defines it.

One file per op (Triton kernel, torch reference, launcher):

- :mod:`.adam`: Adam's moments and direction in one pass;
- :mod:`.adam8bit`: the same on 8-bit blockwise moments (dequantize, update, requantize);
- :mod:`.apply`: project a low-rank step back and apply it with weight decay and the Fira/FRUGAL
  residual, in place, never building the full-size update; the residual's row norms;
- :mod:`.dct_scores`: the DCT projector's selection scores without the ``m x n`` product;
- :mod:`.philox`: seeded random bases (Philox4x32-10) generated inside the kernels that use them:
  materialize, combine (NOLA's forward), project (NOLA's backward); bit-identical to the torch reference;
- :mod:`.basis_matmul`: ``x U^T`` and ``x U`` with such a basis generated inside the matmul (RandLoRA's
  shared basis when it is not stored).

Every op dispatches through :mod:`._dispatch`: the kernel for CUDA tensors when Triton is installed,
the reference elsewhere, either one forceable with :func:`set_backend` / :func:`use_backend` or the
``SLIMTRAIN_KERNELS`` environment variable, every choice logged once and listed by
:func:`backends_used`. The optimizers and adapters call only these entry points, so CPU and GPU users
run the same code above the kernel. (The DCT scores op is reached as
``slimtrain.kernels.dct_scores.dct_scores``: its module bears its name.)
"""

from ._dispatch import BACKENDS, backends_used, get_backend, set_backend, use_backend
from .adam import adam_direction_
from .adam8bit import adam8bit_direction_
from .apply import ResidualOperands, lowrank_apply_, residual_row_sq_norms
from .philox import philox_bits, philox_combine, philox_project, philox_uniform
from .basis_matmul import philox_linear, philox_matmul

__all__ = [
    "BACKENDS",
    "ResidualOperands",
    "adam8bit_direction_",
    "adam_direction_",
    "backends_used",
    "get_backend",
    "lowrank_apply_",
    "philox_bits",
    "philox_combine",
    "philox_linear",
    "philox_matmul",
    "philox_project",
    "philox_uniform",
    "residual_row_sq_norms",
    "set_backend",
    "use_backend",
]
