"""Matmuls with a generated Philox basis (slimtrain.kernels.basis_matmul): the element generator is the
documented stream, both backends stay within the summation bound of the exact product with the basis
rounded to x's dtype (odd shapes, sub-blocks of the basis, several programs and loop trips, strided and
batched x), the two ops are adjoint, the reference holds bounded chunks, bad input is refused by name, and
the kernel compiles for sm_80 / sm_90 in every dtype.

The Triton runs use the interpreter on CPU (tests/conftest.py) or the GPU when there is one. Outputs the
launchers allocate are poisoned (the ``poison`` fixture), so an element the kernel does not write fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from slimtrain.kernels import backends_used, basis_matmul as pm, use_backend
from slimtrain.kernels._triton import HAS_TRITON, interpreting
from slimtrain.kernels.philox import _stream, philox_bits, philox_uniform
from slimtrain.kernels.basis_matmul import philox_elements_reference, philox_linear, philox_matmul

from .._device import DEVICE as TRITON_DEVICE, needs_triton
from .test_philox import assert_within_sum_bound

SEED, LOW, HIGH = (1 << 40) + 77, -1.7, 1.7


def exact_basis(shape, rows, cols, dtype):
    """U[:rows, :cols] as the ops see it: the stream's fp32 values rounded to ``dtype``, then float64."""
    with use_backend("torch"):
        return philox_uniform(SEED, shape, LOW, HIGH, dtype=dtype)[:rows, :cols].double()


def accumulator(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def test_element_generator_is_the_stream():
    """Words at arbitrary flat indices (across the quarter boundaries, numel not a multiple of 4, a
    counter offset past 2^32) are the words of the materialized stream."""
    for shape, offset in (((7, 13), 0), ((3, 1), 5), ((33, 61), (1 << 32) - 100)):
        s = _stream(SEED, shape, -1.0, 1.0, 1, offset)
        full = philox_bits(SEED, shape, offset=offset).reshape(-1)
        index = torch.randperm(full.numel(), generator=torch.Generator().manual_seed(0))
        assert torch.equal(philox_elements_reference(s, index), full[index])


SHAPES = [  # basis shape, rows, cols, x's leading dims
    ((70, 53), 70, 53, (45,)),      # whole basis; 2+ programs per dim with the 32-tile, partial tiles
    ((70, 53), 61, 37, (3, 5)),     # a leading block (RandLoRA's slices), batched x
    ((9, 130), 9, 129, (1,)),       # one row of x; K loop of 9 trips in linear
    ((130, 9), 97, 1, (33,)),       # one column
]
SHAPE_IDS = ["whole-70x53", "block-61x37-batched", "9x129-one-row", "97x1-one-col"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,rows,cols,lead", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op", ["linear", "matmul"])
def test_within_summation_bound(op, shape, rows, cols, lead, dtype, backend, poison):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    k = cols if op == "linear" else rows
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    u = exact_basis(shape, rows, cols, dtype)
    v = u.T if op == "linear" else u  # (k, n)
    fn = philox_linear if op == "linear" else philox_matmul
    with use_backend(backend):
        out = fn(x.to(device), SEED, shape, LOW, HIGH, rows=rows, cols=cols)
    assert out.shape == (*lead, v.shape[1]) and out.dtype == dtype and out.device.type == torch.device(device).type
    terms = x.double().reshape(-1, k).T[:, :, None] * v[:, None, :]  # (k, M, n): summed over k
    assert_within_sum_bound(out.reshape(-1, v.shape[1]), terms, accumulator(dtype))


@needs_triton
@pytest.mark.parametrize("op", ["linear", "matmul"])
def test_kernel_reads_strided_x(op, poison):
    """A transposed view (RandLoRA passes A_f^T) is read through its strides, not copied wrongly."""
    shape, rows, cols = (40, 50), 40, 50
    k = cols if op == "linear" else rows
    base = torch.randn(k, 36, generator=torch.Generator().manual_seed(2))
    x = base.T  # (36, k), strides (1, 36)
    fn = philox_linear if op == "linear" else philox_matmul
    with use_backend("torch"):
        expected = fn(x.contiguous(), SEED, shape, LOW, HIGH)
    with use_backend("triton"):
        out = fn(x.to(TRITON_DEVICE), SEED, shape, LOW, HIGH)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_ops_are_adjoint():
    """<linear(x), y> = <x, matmul(y)> (float64): what makes each the other's backward."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 37, generator=g, dtype=torch.float64), torch.randn(6, 61, generator=g, dtype=torch.float64)
    lhs = (philox_linear(x, SEED, (70, 53), rows=61, cols=37) * y).sum()
    rhs = (x * philox_matmul(y, SEED, (70, 53), rows=61, cols=37)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("op", ["linear", "matmul"])
def test_reference_regenerates_in_bounded_chunks(op, monkeypatch):
    """The CPU path never holds U: row chunks of at most _REFERENCE_CHUNK elements (at least one row), and
    the result does not depend on the chunking."""
    shape, rows, cols = (70, 53), 61, 37
    x = torch.randn(4, cols if op == "linear" else rows, generator=torch.Generator().manual_seed(4))
    fn = philox_linear if op == "linear" else philox_matmul
    whole = fn(x, SEED, shape, rows=rows, cols=cols)
    sizes = []
    original = pm._basis_rows
    monkeypatch.setattr(pm, "_REFERENCE_CHUNK", 5 * cols)
    monkeypatch.setattr(pm, "_basis_rows",
                        lambda s, first, count, *a: sizes.append(count) or original(s, first, count, *a))
    chunked = fn(x, SEED, shape, rows=rows, cols=cols)
    assert max(sizes) == 5 and sum(sizes) == rows
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_empty_input_and_visible_choice():
    out = philox_linear(torch.empty(0, 3, 7), SEED, (5, 7))
    assert out.shape == (0, 3, 5)
    with use_backend("auto"):
        philox_matmul(torch.ones(2, 5), SEED, (5, 7))
    assert backends_used()[("philox_matmul", "cpu")] == "torch"
    if HAS_TRITON and (interpreting() or TRITON_DEVICE.type == "cuda"):
        with use_backend("triton"):
            philox_linear(torch.ones(2, 7, device=TRITON_DEVICE), SEED, (5, 7))
        assert backends_used()[("philox_linear", TRITON_DEVICE.type)] == "triton"


BAD_INPUTS = [
    (lambda: philox_linear(torch.ones(2, 7), SEED, (35,)), r"Invalid shape: \(35,\) \(expected the 2-D shape"),
    (lambda: philox_linear(torch.ones(2, 7), SEED, (5, 0)), r"Invalid shape: \(5, 0\)"),
    (lambda: philox_linear(torch.ones(2, 7), SEED, (5, 7), rows=6), r"Invalid rows: 6 \(expected an integer in \[1, 5\]"),
    (lambda: philox_linear(torch.ones(2, 7), SEED, (5, 7), cols=0), r"Invalid cols: 0"),
    (lambda: philox_linear(torch.ones(2, 7), SEED, (5, 7), cols=2.0), r"Invalid cols: 2.0"),
    (lambda: philox_linear(torch.ones(2, 6), SEED, (5, 7)), r"Invalid x: shape \(2, 6\) \(expected \(\.\.\., 7\)"),
    (lambda: philox_matmul(torch.ones(2, 7), SEED, (5, 7)), r"Invalid x: shape \(2, 7\) \(expected \(\.\.\., 5\)"),
    (lambda: philox_matmul(torch.tensor(1.0), SEED, (5, 7)), r"Invalid x: shape \(\)"),
    (lambda: philox_matmul(torch.ones(2, 5, dtype=torch.int64), SEED, (5, 7)), r"Invalid x: a tensor of dtype"),
    (lambda: philox_matmul(torch.ones(2, 5), -3, (5, 7)), r"Invalid seed: -3"),
    (lambda: philox_matmul(torch.ones(2, 5), SEED, (5, 7), 1.0, 0.5), r"Invalid high: 0.5"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS, ids=[f"bad-{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_is_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from slimtrain.kernels import basis_matmul as pm, philox

    target = GPUTarget("cuda", int(sys.argv[1]), 32)
    count = 0
    for x, out, precision in (("*fp32", "*fp32", "ieee"), ("*fp32", "*fp32", "tf32"), ("*bf16", "*fp32", "tf32"),
                              ("*fp16", "*fp32", "tf32"), ("*fp64", "*fp64", "ieee")):
        for linear in (True, False):
            constexprs = {"LINEAR": linear, "PRECISION": precision, "BM": 64, "BN": 64, "BK": 32}
            signature = {"x_ptr": x, "out_ptr": out, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                         "stride_xk": "i32", "seed": "i64", "offset": "i64", "quarter": "i32", "row_len": "i32",
                         "half": "fp32", "center": "fp32", **{k: "constexpr" for k in constexprs}}
            src = ASTSource(fn=pm._basis_matmul_kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=target, options=philox._LAUNCH_OPTIONS)
            assert compiled.asm["cubin"], (x, linear)
            count += 1
    print(f"compiled {count}")
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernel_compiles_for_gpu(arch):
    """Every dtype and both orientations compile for sm_80 / sm_90 with the launch options (no GPU needed);
    this covers what the interpreter cannot: the lowering of tl.dot in each precision."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(arch)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "compiled 10"
