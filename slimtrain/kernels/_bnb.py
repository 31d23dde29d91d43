"""What 8-bit optimizer state needs from bitsandbytes, and what it refuses to store, in one place.

Shared by the 8-bit Adam kernel's reference (:mod:`.adam8bit`) and the optimizers' blockwise storage
(``slimtrain/optimizers/moments.py``, which imports from here: optimizers depend on kernels, never
the reverse).
"""

from __future__ import annotations

import torch
from torch import Tensor


def functional():
    """``bitsandbytes.functional``, imported on first use; an ``ImportError`` naming the extra if absent."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError as err:  # pragma: no cover - bitsandbytes is in the dev extra
        raise ImportError(
            "8-bit optimizer states need bitsandbytes: pip install 'slimtrain[bnb]' (or state_bits=32)"
        ) from err
    return bnb_functional


def refuse_nonfinite(values: Tensor, name: str, what: str = "values", cause: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` and counting the NaN/inf among ``values`` if there are any.

    bitsandbytes would ignore a NaN when taking a block's absmax and store a code for it, so the poison
    would come back as a plausible number: callers check before writing anything. ``what`` says what
    ``values`` are (e.g. a moment's block absmaxes), ``cause`` is an optional parenthesized hint.
    """
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    bad = values.numel() - int(finite.sum())
    raise ValueError(
        f"Invalid {name}: {bad} of {values.numel()} {what} are NaN or inf{cause}; 8-bit optimizer state never "
        "stores non-finite values, so nothing was written"
    )
