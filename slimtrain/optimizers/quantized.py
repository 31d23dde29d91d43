"""Low-bit storage for the optimizer family: 8-bit Adam moments and bf16 stochastic rounding.

**8-bit moments** use bitsandbytes' blockwise dynamic quantization (Dettmers et al., arXiv:2110.02861;
the scheme of ``bnb.optim.AdamW8bit`` and torchao's ``AdamW8bit``). A moment stored in 8 bits is two
tensors in the parameter's state::

    state[key]               uint8 codes, the moment's own shape
    state[key + "_absmax"]   fp32, one scale per block of ``block_size`` consecutive elements of the
                             flattened moment (the last block is padded, as bitsandbytes does)

and its value is ``absmax[block] * CODE[codes]``. ``CODE`` is bitsandbytes' 256-entry dynamic map,
signed for first moments and unsigned (twice the resolution) for second moments, whose keys start
with ``exp_avg_sq``. The map is a module constant, not per-parameter state: it is a pure function of
``signed`` that bitsandbytes builds the same way for every tensor, and storing it would add 1 KiB per
moment to every checkpoint for nothing (``tests/optimizers/test_8bit.py`` pins its checksum, so a
change upstream cannot silently reinterpret old checkpoints).

A moment with fewer than ``min_8bit_size`` elements (default 4096, bitsandbytes' value) stays fp32:
its absmax would cost 1/64 of it, and these are norms, biases and the small low-rank moments where
quantization error matters most. The update rules in ``functional.py`` never see codes: the
optimizer reads the moments as fp32 through :func:`fp32_moments`, which dequantizes them and
requantizes on exit.

**bf16 stochastic rounding** (:func:`bf16_stochastic_round`, as torchao's ``bf16_stochastic_round``):
a bf16 weight near 1 has a spacing of 2^-8 ~ 3.9e-3, so an update of 1e-4 rounds away to nothing every
step and pure-bf16 training stalls. Rounding up with probability equal to the discarded fraction
makes the expected weight equal to the fp32 result.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from .._seeds import generator, rounding_stream_seed
from ..kernels import _bnb
from ..kernels.adam import adam_direction_
from ..kernels.adam8bit import adam8bit_direction_
from .state import ABSMAX_SUFFIX, moment_slots

STATE_BITS = (32, 8)
# The block sizes bitsandbytes' CUDA kernels accept; its CPU kernel takes any, but a checkpoint must
# resume on either device.
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
SECOND_MOMENT_PREFIX = "exp_avg_sq"


def require_bitsandbytes() -> None:
    """Raise the ``ImportError`` naming the extra now, at construction, rather than at the first step."""
    _bnb.functional()


@functools.cache
def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' 256-entry dynamic quantization map (sorted, fp32) on ``device``, built once."""
    return _bnb.functional().create_dynamic_map(signed=signed).to(device)


def is_second_moment(key: str) -> bool:
    """Whether a state key holds a non-negative second moment (unsigned map)."""
    return key.startswith(SECOND_MOMENT_PREFIX)


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
    F = _bnb.functional()
    codes, qstate = F.quantize_blockwise(
        x.float().contiguous(), code=dynamic_map(signed, x.device), blocksize=block_size, out=out, absmax=absmax
    )
    return codes, qstate.absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, *, signed: bool, block_size: int = 256) -> Tensor:
    """The fp32 tensor that ``codes``/``absmax`` encode (a new tensor of ``codes``' shape)."""
    F = _bnb.functional()
    return F.dequantize_blockwise(codes, absmax=absmax, code=dynamic_map(signed, codes.device), blocksize=block_size)


# ----------------------------------------------------------------------------------------------
# Moments in optimizer state


def _quantized(state: dict, key: str) -> bool:
    return state[key].dtype == torch.uint8


def init_moments(state: dict, group: dict, keys: Sequence[str], shape: Sequence[int], device: torch.device) -> None:
    """Create zero moments of ``shape`` as :func:`~slimtrain.optimizers.state.moment_slots` declares them: 8-bit
    when the group asks for it and the moment has at least ``group["min_8bit_size"]`` elements, fp32 otherwise."""
    for slot in moment_slots(group, keys, shape):
        if slot.dtype == torch.uint8:  # the code that decodes to 0: the map's own zero
            zero_code = 0 if is_second_moment(slot.key) else int(dynamic_map(True).abs().argmin())
            state[slot.key] = torch.full(slot.shape, zero_code, dtype=torch.uint8, device=device)
        else:
            state[slot.key] = torch.zeros(slot.shape, dtype=slot.dtype, device=device)


def zero_moments_(state: dict, keys: Sequence[str]) -> None:
    """Reset moments to zero in place, whatever their storage (an absmax of 0 decodes to 0)."""
    for key in keys:
        if _quantized(state, key):
            state[key + ABSMAX_SUFFIX].zero_()
        else:
            state[key].zero_()


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
def fp32_moments(state: dict, group: dict, *keys: str) -> Iterator[list[Tensor]]:
    """Yield the moments under ``keys`` as fp32 tensors to update in place; store them back on exit.

    fp32 moments are yielded as they are (no copy). 8-bit ones are dequantized on entry and
    requantized into their codes on a normal exit; if the block raises, the stored codes are left as
    they were, and a non-finite result is refused with ``ValueError`` before anything is written.
    """
    values = []
    for key in keys:
        if _quantized(state, key):
            signed, bs = not is_second_moment(key), _block_size(state, key, group)
            values.append(dequantize_blockwise(state[key], state[key + ABSMAX_SUFFIX], signed=signed, block_size=bs))
        else:
            values.append(state[key])
    yield values
    quantized = [(key, value) for key, value in zip(keys, values) if _quantized(state, key)]
    # Encode every moment before writing any, so a refused one leaves the whole set unchanged.
    encoded = [
        quantize_blockwise(value, signed=not is_second_moment(key), block_size=group["block_size"])
        for key, value in quantized
    ]
    for (key, _), (codes, absmax) in zip(quantized, encoded):
        state[key].copy_(codes)
        state[key + ABSMAX_SUFFIX].copy_(absmax)


def adam_direction(state: dict, group: dict, grad: Tensor, m_key: str = "exp_avg", v_key: str = "exp_avg_sq") -> Tensor:
    """Update the Adam moments stored under ``m_key``/``v_key`` from ``grad`` and return the direction
    ``m / (sqrt(v) + eps)``, whatever the moments' storage: through the fused kernels
    (:mod:`slimtrain.kernels.adam`, :mod:`slimtrain.kernels.adam8bit`), which run their torch
    references on CPU. An 8-bit update that would store NaN or inf raises ``ValueError`` and writes nothing."""
    beta1, beta2 = group["betas"]
    if not _quantized(state, m_key):
        return adam_direction_(grad, state[m_key], state[v_key], beta1, beta2, group["eps"])
    block_size = _block_size(state, m_key, group)
    _block_size(state, v_key, group)
    device = grad.device
    return adam8bit_direction_(
        grad,
        state[m_key], state[m_key + ABSMAX_SUFFIX], dynamic_map(True, device),
        state[v_key], state[v_key + ABSMAX_SUFFIX], dynamic_map(False, device),
        beta1, beta2, group["eps"], block_size,
    )


# ----------------------------------------------------------------------------------------------
# bf16 stochastic rounding


def bf16_stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round an fp32 tensor to bf16, up with probability equal to the discarded fraction.

    bf16 is fp32 with the low 16 mantissa bits dropped. Adding 16 uniform random bits below the kept
    mantissa and truncating rounds the magnitude up with probability (dropped bits) / 2^16, so
    ``E[round(x)] = x`` for every finite ``x`` (signs are handled by the sign-magnitude layout; a carry
    into the exponent is the correct next bf16 value). ``generator`` (on ``x``'s device) keeps the
    draw off the global RNG.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"Invalid tensor to round: dtype {x.dtype} (expected torch.float32)")
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits = x.contiguous().view(torch.int32) + noise
    return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # -65536 == 0xFFFF0000


def rounding_generator(state: dict, seed: int, device: torch.device) -> torch.Generator:
    """The generator for one stochastic rounding of a parameter, from ``state``'s ``sr_seed`` (created
    from ``seed`` the first time) and ``sr_step`` (counted here): reproducible on resume, independent
    of the global RNG and of the projectors' streams (:func:`slimtrain._seeds.rounding_stream_seed`)."""
    if "sr_seed" not in state:
        state["sr_seed"] = torch.tensor(seed, dtype=torch.int64)
        state["sr_step"] = torch.zeros((), dtype=torch.int64)
    state["sr_step"] += 1
    return generator(rounding_stream_seed(int(state["sr_seed"]), int(state["sr_step"])), device)


class EightBitStates:
    """Mixin for the ``*8bit`` classes: the same optimizer with ``state_bits=8`` (torchao's naming)."""

    def __init__(self, params, *args, **kwargs):
        bits = kwargs.setdefault("state_bits", 8)
        if bits != 8:
            mro = type(self).__mro__
            full = mro[mro.index(EightBitStates) + 1].__name__
            raise ValueError(
                f"Invalid state_bits: {bits!r} ({type(self).__name__} keeps 8-bit states; use "
                f"{full}(state_bits=...) for another width)"
            )
        super().__init__(params, *args, **kwargs)
