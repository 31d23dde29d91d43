"""The ``...8bit`` twins' common part."""

from __future__ import annotations


class EightBitStates:
    """Mixin of the ``...8bit`` twins (``GaLoreAdamW8bit``, ...): the method with ``state_bits=8``, torchao's naming.

    Moments with at least ``min_8bit_size`` (4096) elements are stored as uint8 codes plus one fp32 absmax per
    ``block_size`` (256) elements, bitsandbytes' blockwise dynamic quantization: about 1/4 of their fp32 bytes.
    Smaller ones stay fp32, and so does everything that is not a moment: projector bases and indices, counters,
    and SST's singular factors, which are the weight itself rather than a running statistic. See
    ``docs/low_bit.md``.
    """

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
