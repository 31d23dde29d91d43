"""The fused 8-bit Adam kernel: nearest-code requantization (float64 oracle), agreement with the
bitsandbytes-based reference to within one code, and a refused overflow that writes nothing."""

from __future__ import annotations

import pytest
import torch

from slimtrain.kernels.adam8bit import adam8bit_direction_, adam8bit_direction_reference

from .conftest import DEVICE

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

MAPS = {signed: F.create_dynamic_map(signed=signed).to(DEVICE) for signed in (True, False)}
# The widest gap between neighbouring codes (top decade of the map, see tests/optimizers/test_8bit.py)
# and how far bitsandbytes' CPU rounding can land beyond the nearest code (measured there).
MAX_GAP = {True: 0.0140625, False: 0.00703125}
CPU_SLACK = 4e-5


def _state(shape, block_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g) * 1e-2
    v = torch.rand(shape, generator=g) * 1e-4
    m_codes, m_q = F.quantize_blockwise(m, code=MAPS[True].cpu(), blocksize=block_size)
    v_codes, v_q = F.quantize_blockwise(v, code=MAPS[False].cpu(), blocksize=block_size)
    grad = torch.randn(shape, generator=g) * 1e-2
    return [t.to(DEVICE) for t in (grad, m_codes, m_q.absmax, v_codes, v_q.absmax)]


def _run(fn, grad, state, block_size):
    m_codes, m_absmax, v_codes, v_absmax = state
    return fn(grad, m_codes, m_absmax, MAPS[True], v_codes, v_absmax, MAPS[False], 0.9, 0.999, 1e-8, block_size)


def _dequantize(codes, absmax, signed, block_size):
    flat = MAPS[signed][codes.long().reshape(-1)]
    scale = absmax.repeat_interleave(block_size)[: flat.numel()]
    return (flat * scale).reshape(codes.shape)


def _float64_moments(grad, state, block_size):
    m = _dequantize(state[0], state[1], True, block_size).double()
    v = _dequantize(state[2], state[3], False, block_size).double()
    g = grad.double()
    return 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g


@pytest.mark.parametrize("shape", [(37, 29), (5, 64), (1000,)])
@pytest.mark.parametrize("block_size", [64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_rounds_to_the_nearest_code(shape, block_size, dtype, triton_backend, poison):
    grad, *state = _state(shape, block_size)
    grad = grad.to(dtype)
    m64, v64 = _float64_moments(grad, state, block_size)
    direction = _run(adam8bit_direction_, grad, state, block_size)
    torch.testing.assert_close(direction.double(), m64 / (v64.sqrt() + 1e-8), rtol=1e-5, atol=1e-5)
    for signed, exact, codes, absmax in ((True, m64, state[0], state[1]), (False, v64, state[2], state[3])):
        blocks = torch.nn.functional.pad(exact.reshape(-1), (0, absmax.numel() * block_size - exact.numel()))
        torch.testing.assert_close(absmax.double(), blocks.view(-1, block_size).abs().amax(1), rtol=1e-6, atol=0)
        normalized = (exact.reshape(-1) / absmax.double().repeat_interleave(block_size)[: exact.numel()])
        distance = (MAPS[signed].double()[None, :] - normalized[:, None]).abs()
        chosen = distance.gather(1, codes.long().reshape(-1, 1)).squeeze(1)
        # Nearest up to fp32 rounding of the normalized value (ties may go either way).
        assert (chosen - distance.min(1).values).max() < 1e-6


@pytest.mark.parametrize("block_size", [64, 256])
def test_kernel_agrees_with_the_bitsandbytes_reference_within_one_code(block_size, triton_backend):
    grad, *state = _state((37, 29), block_size, seed=3)
    ref_state = [t.clone() for t in state]
    direction = _run(adam8bit_direction_, grad, state, block_size)
    with torch.no_grad():
        from slimtrain import kernels

        with kernels.use_backend("torch"):
            expected = _run(adam8bit_direction_reference, grad.cpu(), [t.cpu() for t in ref_state], block_size)
    torch.testing.assert_close(direction.cpu(), expected, rtol=1e-6, atol=1e-6)
    for signed, i in ((True, 0), (False, 2)):
        ours = _dequantize(state[i], state[i + 1], signed, block_size).cpu()
        theirs = _dequantize(ref_state[i].to(DEVICE), ref_state[i + 1].to(DEVICE), signed, block_size).cpu()
        bound = (MAX_GAP[signed] + CPU_SLACK) * state[i + 1].cpu().repeat_interleave(block_size)[: ours.numel()]
        assert ((ours - theirs).abs().reshape(-1) <= bound).all()
        assert (state[i].cpu() == ref_state[i]).float().mean() > 0.9  # mostly the very same codes


# The interpreter computes with numpy, which warns about the overflow the test provokes.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_overflow_is_refused_and_nothing_is_written(backend):
    from slimtrain import kernels

    grad, *state = _state((37, 29), 64)
    grad[3, 4] = 1e22  # finite, but its square overflows fp32
    before = [t.clone() for t in state]
    with kernels.use_backend(backend), pytest.raises(ValueError, match="Invalid exp_avg_sq: .*nothing was written"):
        _run(adam8bit_direction_, grad, state, 64)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


def test_bad_inputs_name_the_parameter():
    grad, *state = _state((37, 29), 64)
    with pytest.raises(ValueError, match=r"Invalid block_size: 96 \(expected a power of two\)"):
        _run(adam8bit_direction_, grad, state, 96)
    with pytest.raises(ValueError, match=r"Invalid exp_avg absmax: .* 5 elements \(expected .* with 17"):
        adam8bit_direction_(grad, state[0], state[1][:5], MAPS[True], *state[2:], MAPS[False], 0.9, 0.9, 1e-8, 64)
    with pytest.raises(ValueError, match=r"Invalid exp_avg_sq: torch.float32"):
        adam8bit_direction_(grad, *state[:2], MAPS[True], state[2].float(), state[3], MAPS[False], 0.9, 0.9, 1e-8, 64)
