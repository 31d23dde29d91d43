"""Projector refresh cost on LLaMA-7B-shaped matrices: exact SVD vs randomized vs DCT (and random).

Question: what does one subspace refresh cost per matrix, and how far is each cheap projector's subspace
from the exact SVD's? Each projector's ``refresh`` is timed on a random gradient of the given shape (fp32,
this machine's CPU threads), best of ``--repeats`` runs. Quality: the fraction of the gradient's energy
the chosen rank-r subspace captures, ``||G B^T||_F^2 / ||G||_F^2`` (the exact SVD maximizes it), on a
gradient with a decaying spectrum (singular values ``~ 1/sqrt(i)``) so that subspaces differ.

    python -m benchmarks.refresh_cost                 # 7B shapes, rank 1024: several minutes on 2 CPU cores
    python -m benchmarks.refresh_cost --quick         # small shapes, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from benchmarks._cli import command_line, invocation, results_dir
from slimtrain.optimizers.projectors import make_projector

SHAPES_7B = [(4096, 4096), (11008, 4096)]  # attention (q, k, v, o) and MLP (gate/up, down^T), oriented m' >= n'


def spectral_gradient(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A random m x n matrix with singular values 1/sqrt(i): structured enough that subspaces differ."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32).sqrt()
    return (u * s) @ v.T


def main(argv=None):
    parser = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="shapes 512 x 256 and 1376 x 512, rank 64")
    parser.add_argument("--out", default=None,
                        help="results file (default results/refresh_cost.md; with --quick, in runs/benchmarks-quick)")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(results_dir(args.quick), "refresh_cost.md")
    shapes, rank = (SHAPES_7B, args.rank) if not args.quick else ([(512, 256), (1376, 512)], 64)
    projectors = ["svd", "randomized", "dct", "random"]
    rows = []
    for m, n in shapes:
        grad = spectral_gradient(m, n)
        total = grad.square().sum()
        times = {}
        for name in projectors:
            proj = make_projector(name)
            best = float("inf")
            for _ in range(args.repeats):
                state = {}
                proj.init_state(state, seed=0)
                t0 = time.perf_counter()
                proj.refresh(grad, state, rank, transposed=False)
                basis = proj.basis(state, n, grad.device)
                best = min(best, time.perf_counter() - t0)
            captured = float((grad @ basis.T).square().sum() / total)
            times[name] = best
            rows.append((f"{m} x {n}", name, best, captured))
    svd_time = {shape: t for shape, name, t, _ in rows if name == "svd"}
    lines = [
        "# Projector refresh cost",
        "",
        f"Produced by `{command_line(__file__, argv)}` on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"fp32, rank {rank}, best of {args.repeats}. Time: one `refresh` plus materializing the r x n basis. "
        "Energy: fraction of the gradient's squared Frobenius norm inside the chosen subspace (spectrum 1/sqrt(i)).",
        "",
        "| matrix (oriented) | projector | refresh time | vs exact SVD | energy captured |",
        "|---|---|---|---|---|",
    ]
    for shape, name, t, captured in rows:
        lines.append(f"| {shape} | {name} | {t:.2f} s | {t / svd_time[shape]:.3f}x | {captured:.3f} |")
    lines += [
        "",
        "The synthetic gradient's singular vectors are random, the worst case for a fixed basis: the DCT's energy",
        "here is a floor. Real gradients are smoother along their input dimension; the convergence benchmark",
        "shows what the choice costs in training (benchmarks/results/convergence.md).",
        "",
        "The random projector's refresh draws nothing up front (its basis is regenerated from a seed each step), so",
        "its time here is the cost of generating the basis once. GPU rows: not measured (no GPU on this machine).",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
