"""Fused kernels against their torch references: time, and achieved bandwidth as a fraction of a copy.

Question: how close does each fused op get to the memory bandwidth the device can deliver, and how much
faster is it than the torch code it replaces? Every op of ``slimtrain.kernels`` is timed on an
LLaMA-7B MLP-shaped matrix (11008 x 4096 oriented, rank 1024; ``--quick`` shrinks it) with both
backends where they can run: the torch reference everywhere, the Triton kernel only on a CUDA device.
Achieved bandwidth counts the bytes an op must move at least (each input read once, each output
written once; listed per op below), divided by the median time; the device's copy bandwidth is
measured the same way with ``dst.copy_(src)`` on 256 MiB.

Without a GPU the Triton rows are written as "not run" with the reason: the interpreter that runs the
kernels on CPU for the tests is a debugging tool (about 2 ms per program instance), and timing it
would say nothing about the kernels.

    python -m benchmarks.kernel_speed            # on whatever device is present (CUDA if any)
    python -m benchmarks.kernel_speed --quick    # small shapes, seconds

On a CUDA device the table goes to ``results/kernels_gpu.md`` (naming the GPU and the torch, Triton and
CUDA versions), elsewhere to ``results/kernels.md``. Matmul-bound rows also report TFLOP/s: their
fraction of copy bandwidth is small by nature, and what bounds them is the device's fp32 (or TF32) rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks._cli import command_line, invocation, results_dir
from slimtrain import kernels
from slimtrain.kernels.adam import adam_direction_
from slimtrain.kernels.adam8bit import adam8bit_direction_
from slimtrain.kernels.apply import ResidualOperands, lowrank_apply_, residual_row_sq_norms
from slimtrain.kernels.basis_matmul import philox_linear, philox_matmul
from slimtrain.kernels.dct_scores import dct_scores
from slimtrain.optimizers.projectors.dct import dct_matrix

F32 = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compilation, autotuning, allocator
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    src = torch.empty(64 << 20, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * F32 / median_time(lambda: dst.copy_(src), device, repeats)


def cases(m: int, n: int, r: int, device: torch.device):
    """(op, shape text, minimal bytes moved, floating-point operations, a function running it once)."""
    g = torch.Generator(device=device).manual_seed(0)
    grad = torch.randn(m, n, generator=g, device=device)
    weight = torch.randn(m, n, generator=g, device=device)
    basis = torch.linalg.qr(torch.randn(n, r, generator=g, device=device))[0].T.contiguous()
    low = grad @ basis.T
    direction = torch.randn(m, r, generator=g, device=device)
    m_state, v_state = torch.zeros(m, r, device=device), torch.zeros(m, r, device=device)
    shape = f"{m}x{n} r={r}"
    yield ("adam_direction (m' x r)", f"{m}x{r}", 6 * m * r * F32, 0,
           lambda: adam_direction_(low, m_state, v_state, 0.9, 0.999, 1e-8))

    import bitsandbytes.functional as BF

    maps = [BF.create_dynamic_map(signed=s).to(device) for s in (True, False)]
    codes = [torch.zeros(m, r, dtype=torch.uint8, device=device) for _ in range(2)]
    absmax = [torch.zeros(-(-m * r // 256), device=device) for _ in range(2)]
    yield ("adam8bit_direction (m' x r)", f"{m}x{r}", m * r * (2 * F32 + 4), 0,
           lambda: adam8bit_direction_(low, codes[0], absmax[0], maps[0], codes[1], absmax[1], maps[1],
                                       0.9, 0.999, 1e-8, 256))
    yield ("lowrank_apply (GaLore)", shape, 2 * m * n * F32 + (m + n) * r * F32, 2 * m * n * r,
           lambda: lowrank_apply_(weight, direction, basis, alpha=1e-6, decay_before=1.0))
    fira = ResidualOperands(grad, low, False, 1.0, 1e-6, torch.ones(m, device=device))
    yield ("lowrank_apply (Fira residual)", shape, 3 * m * n * F32 + (2 * m + n) * r * F32, 4 * m * n * r,
           lambda: lowrank_apply_(weight, direction, basis, alpha=1e-6, residual=fira))
    yield ("residual_row_sq_norms (Fira)", shape, m * n * F32 + (m + n) * r * F32, 2 * m * n * r,
           lambda: residual_row_sq_norms(grad, low, basis))
    dct = dct_matrix(n, device)
    yield ("dct_scores (matmul backend)", f"{m}x{n}", (m * n + n * n) * F32, 2 * m * n * n, lambda: dct_scores(grad, dct, 1))
    # RandLoRA's products with a generated m x n basis, for 512 tokens. Bytes: x and the output only (the
    # basis is never read), so these rows are bound by arithmetic, not bandwidth; the "stored basis" row is
    # the plain torch matmul they replace, whose time is the price of storing nothing.
    tokens = 512
    x_in, x_out = (torch.randn(tokens, k, generator=g, device=device) for k in (n, m))
    stored = torch.empty(m, n, device=device).uniform_(-1.7, 1.7, generator=g)
    yield ("x U^T, stored basis (plain torch matmul, no kernel)", f"{tokens}x{n} @ ({m}x{n})^T",
           (m * n + tokens * (m + n)) * F32, 2 * tokens * m * n, lambda: x_in @ stored.T)
    yield ("philox_linear (x U^T, U generated)", f"{tokens}x{n} @ ({m}x{n})^T", tokens * (m + n) * F32,
           2 * tokens * m * n, lambda: philox_linear(x_in, 7, (m, n), -1.7, 1.7))
    yield ("philox_matmul (x U, U generated)", f"{tokens}x{m} @ {m}x{n}", tokens * (m + n) * F32,
           2 * tokens * m * n, lambda: philox_matmul(x_out, 7, (m, n), -1.7, 1.7))


def describe(device: torch.device) -> str:
    """The machine and versions a result was measured with, for the results file's header."""
    versions = f"torch {torch.__version__}"
    try:
        import triton

        versions += f", Triton {triton.__version__}"
    except ImportError:
        versions += ", no Triton"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), {versions}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), {versions}"


def row(op, shape, backend, t, nbytes, flops, copy_bw, t_ref) -> str:
    tflops = f"{flops / t / 1e12:.1f}" if flops else ""
    return (f"| {op} | {shape} | {backend} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {nbytes / t / copy_bw:.2f} "
            f"| {tflops} | {t_ref / t:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1376 x 512 matrix, rank 128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="results file (default results/kernels_gpu.md on CUDA, "
                        "results/kernels.md elsewhere; with --quick, in runs/benchmarks-quick)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or os.path.join(results_dir(args.quick), "kernels_gpu.md" if device.type == "cuda" else "kernels.md")
    m, n, r = (1376, 512, 128) if args.quick else (11008, 4096, 1024)
    copy_bw = copy_bandwidth(device, args.repeats)
    name = describe(device)

    rows = []
    for op, shape, nbytes, flops, run in cases(m, n, r, device):
        with kernels.use_backend("torch"):
            t_ref = median_time(run, device, args.repeats)
        ref = row(op, shape, "torch reference", t_ref, nbytes, flops, copy_bw, t_ref)
        if "no kernel" in op:
            rows.append(ref)
            print(ref, flush=True)
            continue
        if device.type == "cuda":
            with kernels.use_backend("triton"):
                t = median_time(run, device, args.repeats)
            fused = row(op, shape, "Triton", t, nbytes, flops, copy_bw, t_ref)
        else:
            fused = f"| {op} | {shape} | Triton | not run: no GPU on this machine | | | | |"
        rows += [ref, fused]
        print(ref, fused, sep="\n", flush=True)

    command = command_line(__file__, argv)
    lines = [
        "# Fused kernels: time and achieved bandwidth",
        "",
        f"Produced by `{command}` on {name}. Copy bandwidth measured here: "
        f"{copy_bw / 1e9:.1f} GB/s (`dst.copy_(src)`, 256 MiB, read + write counted).",
        "",
        "Bandwidth counts the bytes each op must move at least (inputs read once, outputs written once), over the "
        "median of " + f"{args.repeats} runs. TFLOP/s is given for the matmul-bound rows (fp32 products "
        f"{'in TF32' if torch.backends.cuda.matmul.allow_tf32 else 'in full fp32 (TF32 off)'}). 'Speedup' is the "
        "reference's time over this row's.",
        "",
        "| op | shape | backend | time (ms) | GB/s | fraction of copy | TFLOP/s | speedup |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if device.type != "cuda":
        lines += [
            "The Triton rows are empty: this machine has no GPU, and Triton's CPU interpreter (which the tests use to "
            "check every kernel against its reference) is far too slow to time. Run this script on a CUDA machine to "
            "fill them (`scripts/gpu_check.sh` does, into `kernels_gpu.md`).",
            "",
        ]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
