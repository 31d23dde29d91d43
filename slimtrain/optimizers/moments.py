"""How every rule keeps its moments, in fp32 or in 8 bits, and the Adam update on them whatever their storage.

A rule declares its moments (:class:`~slimtrain.optimizers.state.Moment`: a key and whether its values can be
negative) and never touches their storage: it creates them with :func:`init_moments`, runs Adam on them with
:func:`adam_direction`, and reads or rewrites them as fp32 (a refresh rotating them) inside
:func:`fp32_moments`. The group's ``state_bits`` decides the storage.

**8-bit moments** use bitsandbytes' blockwise dynamic quantization (Dettmers et al., arXiv:2110.02861;
the scheme of ``bnb.optim.AdamW8bit`` and torchao's ``AdamW8bit``). A moment stored in 8 bits is two
tensors in the parameter's state::

    state[key]               uint8 codes, the moment's own shape
    state[key + "_absmax"]   fp32, one scale per block of ``block_size`` consecutive elements of the
                             flattened moment (the last block is padded, as bitsandbytes does)

and its value is ``absmax[block] * CODE[codes]``. ``CODE`` is bitsandbytes' 256-entry dynamic map, signed
for a moment declared signed (Adam's first) and unsigned, with twice the resolution, for one declared
non-negative (its second). The map is a module constant, not per-parameter state: it is a pure function
of ``signed`` that bitsandbytes builds the same way for every tensor, and storing it would add 1 KiB per
moment to every checkpoint for nothing (``tests/optimizers/test_8bit.py`` pins its checksum, so a change
upstream cannot silently reinterpret stored codes).

A moment with fewer than ``min_8bit_size`` elements (default 4096, bitsandbytes' value) stays fp32: its
absmax would cost 1/64 of it, and these are norms, biases and the small low-rank moments where
quantization error matters most. The update rules in ``functional.py`` never see codes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from ..kernels import _bnb
from ..kernels.adam import adam_direction_
from ..kernels.adam8bit import adam8bit_direction_
from .state import ABSMAX_SUFFIX, ADAM, Moment, moment_slots


def require_bitsandbytes() -> None:
    """Raise the ``ImportError`` naming the extra now, at construction, rather than at the first step."""
    _bnb.functional()


@functools.cache
def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' 256-entry dynamic quantization map (sorted, fp32) on ``device``, built once."""
    return _bnb.functional().create_dynamic_map(signed=signed).to(device)


def num_blocks(numel: int, block_size: int) -> int:
    return -(-numel // block_size)


def quantize_blockwise(
    x: Tensor, *, signed: bool, block_size: int = 256, out: Tensor | None = None, absmax: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Codes (uint8, ``x``'s shape) and per-block absmax (fp32) of an fp32 tensor.

    Refuses NaN and inf (``ValueError``): bitsandbytes would ignore a NaN when taking the block's
    absmax and store a code for it, so the poison would come back as a plausible number. Writes into
    ``out``/``absmax`` when given (the stored tensors, so quantizing allocates no state).
    """
    if not x.is_floating_point():
        raise ValueError(f"Invalid tensor to quantize: dtype {x.dtype} (expected a floating-point tensor)")
    _bnb.refuse_nonfinite(x, "tensor to quantize")
    codes, qstate = _bnb.functional().quantize_blockwise(
        x.float().contiguous(), code=dynamic_map(signed, x.device), blocksize=block_size, out=out, absmax=absmax
    )
    return codes, qstate.absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, *, signed: bool, block_size: int = 256) -> Tensor:
    """The fp32 tensor that ``codes``/``absmax`` encode (a new tensor of ``codes``' shape)."""
    return _bnb.functional().dequantize_blockwise(codes, absmax=absmax, code=dynamic_map(signed, codes.device),
                                                  blocksize=block_size)


# ----------------------------------------------------------------------------------------------
# Moments in optimizer state


def _quantized(state: dict, key: str) -> bool:
    return state[key].dtype == torch.uint8


def init_moments(state: dict, group: dict, moments: Sequence[Moment], shape: Sequence[int], device: torch.device) -> None:
    """Create zero ``moments`` of ``shape`` as :func:`~slimtrain.optimizers.state.moment_slots` declares them: 8-bit
    when the group asks for it and the moment has at least ``group["min_8bit_size"]`` elements, fp32 otherwise."""
    for slot in moment_slots(group, moments, shape):
        if slot.dtype == torch.uint8:  # the code that decodes to 0: the map's own zero
            zero_code = int(dynamic_map(True).abs().argmin()) if slot.signed else 0
            state[slot.key] = torch.full(slot.shape, zero_code, dtype=torch.uint8, device=device)
        else:
            state[slot.key] = torch.zeros(slot.shape, dtype=slot.dtype, device=device)


def zero_moments_(state: dict, moments: Sequence[Moment]) -> None:
    """Reset ``moments`` to zero in place, whatever their storage (an absmax of 0 decodes to 0)."""
    for m in moments:
        if _quantized(state, m.key):
            state[m.key + ABSMAX_SUFFIX].zero_()
        else:
            state[m.key].zero_()


def _block_size(state: dict, key: str, group: dict) -> int:
    block_size = group["block_size"]
    expected = num_blocks(state[key].numel(), block_size)
    if state[key + ABSMAX_SUFFIX].numel() != expected:
        raise RuntimeError(
            f"State {key!r} has {state[key + ABSMAX_SUFFIX].numel()} absmax blocks but block_size={block_size} "
            f"needs {expected}: block_size was changed after the state was created; restore the original value"
        )
    return block_size


@contextmanager
def fp32_moments(state: dict, group: dict, moments: Sequence[Moment]) -> Iterator[list[Tensor]]:
    """Yield ``moments`` as fp32 tensors to update in place; store them back on exit.

    fp32 moments are yielded as they are (no copy). 8-bit ones are dequantized on entry and
    requantized into their codes on a normal exit; if the block raises, the stored codes are left as
    they were, and a non-finite result is refused with ``ValueError`` before anything is written.
    """
    values = []
    for m in moments:
        if _quantized(state, m.key):
            codes, absmax, bs = state[m.key], state[m.key + ABSMAX_SUFFIX], _block_size(state, m.key, group)
            values.append(dequantize_blockwise(codes, absmax, signed=m.signed, block_size=bs))
        else:
            values.append(state[m.key])
    yield values
    stored = [(m, value) for m, value in zip(moments, values) if _quantized(state, m.key)]
    # Encode every moment before writing any, so a refused one leaves the whole set unchanged.
    encoded = [quantize_blockwise(value, signed=m.signed, block_size=group["block_size"]) for m, value in stored]
    for (m, _), (codes, absmax) in zip(stored, encoded):
        state[m.key].copy_(codes)
        state[m.key + ABSMAX_SUFFIX].copy_(absmax)


def adam_direction(state: dict, group: dict, grad: Tensor, moments: tuple[Moment, Moment] = ADAM) -> Tensor:
    """Update Adam's ``moments`` (first, second) from ``grad`` and return the direction ``m / (sqrt(v) + eps)``,
    whatever the moments' storage: through the fused kernels (:mod:`slimtrain.kernels.adam`,
    :mod:`slimtrain.kernels.adam8bit`), which run their torch references on CPU. An 8-bit update that would
    store NaN or inf raises ``ValueError`` and writes nothing."""
    beta1, beta2 = group["betas"]
    m_key, v_key = moments[0].key, moments[1].key
    if not _quantized(state, m_key):
        return adam_direction_(grad, state[m_key], state[v_key], beta1, beta2, group["eps"])
    block_size = _block_size(state, m_key, group)
    _block_size(state, v_key, group)
    device = grad.device
    return adam8bit_direction_(
        grad,
        state[m_key], state[m_key + ABSMAX_SUFFIX], dynamic_map(moments[0].signed, device),
        state[v_key], state[v_key + ABSMAX_SUFFIX], dynamic_map(moments[1].signed, device),
        beta1, beta2, group["eps"], block_size,
    )
