"""The fused Adam kernel against its torch reference (and the reference against float64)."""

from __future__ import annotations

import pytest
import torch

from slimtrain.kernels.adam import adam_direction_, adam_direction_reference

from .conftest import DEVICE

# Odd sizes: one element, a partial block, and (interpreted) more than one 16384-element block.
SHAPES = [(1,), (37, 5), (3, 1001), (40000,)]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=g).to(dtype)
    m = torch.randn(shape, generator=g) * 0.1
    v = torch.rand(shape, generator=g) * 0.01
    return grad.to(DEVICE), m.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_reference(shape, dtype, triton_backend, poison):
    grad, m, v = _inputs(shape, dtype)
    m_ref, v_ref = m.clone(), v.clone()
    direction = adam_direction_(grad, m, v, 0.9, 0.999, 1e-8)
    expected = adam_direction_reference(grad, m_ref, v_ref, 0.9, 0.999, 1e-8)
    # The gradient is upcast exactly in both; what remains is fp32 rounding (fused multiply-adds on a GPU).
    torch.testing.assert_close(m, m_ref, rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(v, v_ref, rtol=2e-7, atol=1e-9)
    torch.testing.assert_close(direction, expected, rtol=1e-6, atol=1e-6)


def test_reference_is_adam_in_float64():
    grad, m, v = _inputs((5, 3), torch.float32)
    g64, m64, v64 = grad.double(), m.double(), v.double()
    direction = adam_direction_reference(grad, m, v, 0.9, 0.99, 1e-6)
    m64 = 0.9 * m64 + 0.1 * g64
    v64 = 0.99 * v64 + 0.01 * g64**2
    torch.testing.assert_close(m.double(), m64)
    torch.testing.assert_close(direction.double(), m64 / (v64.sqrt() + 1e-6))


@pytest.mark.parametrize(
    "moment, message",
    [
        (torch.zeros(4, 3, dtype=torch.float64), r"Invalid exp_avg: dtype torch.float64 \(expected torch.float32\)"),
        (torch.zeros(3, 4), r"Invalid exp_avg: shape \(3, 4\) \(expected the gradient's \(4, 3\)\)"),
        (torch.zeros(3, 4).T, r"Invalid exp_avg: a non-contiguous tensor"),
    ],
)
def test_bad_moments_are_refused(moment, message):
    with pytest.raises(ValueError, match=message):
        adam_direction_(torch.zeros(4, 3), moment, torch.zeros(4, 3), 0.9, 0.999, 1e-8)
