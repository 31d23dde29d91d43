"""Compile every optimizer kernel ahead of time for NVIDIA targets, without a GPU (run as a script by
test_aot.py, in a process where TRITON_INTERPRET is off so the kernels are real JIT functions).

Catches what the interpreter cannot: type errors in the lowering, bf16 paths (the interpreter cannot
do bf16 arithmetic), tl.dot shape rules and constexpr branches the CPU tests never take.
"""

from __future__ import annotations

import os
import re
import sys

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from slimtrain.kernels import adam, adam8bit, apply, dct_scores  # noqa: E402


def _compile(kernel, signature: dict, constexprs: dict, arch: int) -> None:
    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    assert "ptx" in compiled.asm and compiled.asm["cubin"], kernel.__name__
    # tl.sqrt and fp32 "/" lower to approximate instructions on NVIDIA GPUs (the interpreter computes them
    # exactly); the kernels use tl.sqrt_rn / tl.div_rn so that they round as torch does.
    approximate = re.findall(r"\b(?:sqrt\.approx|div\.full|div\.approx|rcp\.approx)\.[a-z0-9.]+", compiled.asm["ptx"])
    assert not approximate, f"{kernel.__name__}: approximate arithmetic in the PTX: {sorted(set(approximate))}"


def cases():
    i32, f32 = "i32", "fp32"
    for g in ("*fp32", "*bf16"):
        yield adam._adam_direction_kernel, {
            "g_ptr": g, "m_ptr": "*fp32", "v_ptr": "*fp32", "out_ptr": "*fp32",
            "numel": i32, "beta1": f32, "one_minus_beta1": f32, "beta2": f32, "one_minus_beta2": f32, "eps": f32,
        }, {"BLOCK": 1024}
        yield adam8bit._adam8bit_kernel, {
            "g_ptr": g, "m_codes_ptr": "*u8", "m_absmax_ptr": "*fp32", "m_map_ptr": "*fp32",
            "v_codes_ptr": "*u8", "v_absmax_ptr": "*fp32", "v_map_ptr": "*fp32",
            "m_codes_out": "*u8", "m_absmax_out": "*fp32", "v_codes_out": "*u8", "v_absmax_out": "*fp32",
            "dir_ptr": "*fp32", "numel": i32, "beta1": f32, "one_minus_beta1": f32, "beta2": f32,
            "one_minus_beta2": f32, "eps": f32,
        }, {"BLOCK": 256}
        yield apply._residual_row_sq_norms_kernel, {
            "out_ptr": "*fp32", "g_ptr": g, "r_ptr": "*fp32", "b_ptr": "*fp32", "M": i32, "N": i32, "K": i32,
            "stride_gm": i32, "stride_gn": i32, "coef": f32,
        }, {"PRECISION": "ieee", "BM": 64, "BN": 64, "BK": 32}
        yield dct_scores._dct_scores_kernel, {
            "out_ptr": "*fp32", "g_ptr": g, "c_ptr": "*fp32", "M": i32, "N": i32, "stride_gm": i32,
            "stride_gn": i32, "rows_per_split": i32,
        }, {"L1": True, "PRECISION": "tf32", "BM": 64, "BN": 64, "BK": 32}
    for w in ("*fp32", "*bf16", "*fp16"):
        for residual, sign in ((False, False), (True, False), (True, True)):
            yield apply._lowrank_apply_kernel, {
                "w_ptr": w, "n_ptr": "*fp32", "b_ptr": "*fp32", "g_ptr": w, "r_ptr": "*fp32", "s_ptr": "*fp32",
                "M": i32, "N": i32, "K": i32, "stride_wm": i32, "stride_wn": i32, "stride_gm": i32,
                "stride_gn": i32, "alpha": f32, "beta": f32, "coef": f32, "decay_before": f32, "decay_after": f32,
            }, {"RESIDUAL": residual, "SIGN": sign, "ROW_SCALE": residual, "PRECISION": "ieee",
                "BM": 64, "BN": 64, "BK": 32}


if __name__ == "__main__":
    archs = [int(a) for a in sys.argv[1:]] or [80, 90]
    count = 0
    for arch in archs:
        for kernel, signature, constexprs in cases():
            _compile(kernel, signature, constexprs, arch)
            count += 1
    print(f"compiled {count}")
