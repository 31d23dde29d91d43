"""How many bytes does each optimizer actually hold in its state, and is that what the method promises?

Builds the ``small`` LLaMA of the pretrain recipe, takes one optimizer step with each optimizer (same
model, same batch), and sums the bytes of every distinct tensor reachable from ``optimizer.state``
(galore-torch and apollo-torch keep their projection matrix inside a Python projector object; it is
counted). Next to it, the analytic expectation, so a reader can check the arithmetic:

- dense parameters (embeddings, norms, lm_head, and everything under AdamW): 2 moments x numel;
- each projected m x n matrix at rank r: 2 moments x max(m, n) x r, plus the basis: r x min(m, n)
  floats for SVD / random projections, r int64 indices for DCT; SST keeps the factors U (m x d),
  V (n x d), Sigma (d) with d = min(m, n), the r sampled indices, Adam moments for Sigma (2d) and for
  the r sampled vector pairs (2 r (m + n));
- 8-bit variants: moments with >= 4096 elements stored as 1 byte each plus one fp32 scale per block
  of 256; smaller ones stay fp32.

"other" is measured minus expected: step counters, seeds, per-matrix scalars.

    python -m benchmarks.state_memory            # about a minute (73 s measured, one thread, busy machine)
    python -m benchmarks.state_memory --quick    # tiny model
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch

from benchmarks._cli import command_line, invocation, results_dir
from slimtrain.recipes.models import build_model, model_config, smallest_matrix_dim
from slimtrain.recipes.optim import (
    DEFAULTS,
    OPTIMIZER_NAMES,
    REFERENCE_NAMES,
    build_optimizer,
    default_rank,
    state_tensor_bytes,
)

IMPLEMENTATION = {"adamw": "torch.optim.AdamW", "galore-torch": "galore_torch.GaLoreAdamW 1.0",
                  "apollo-torch": "apollo_torch.APOLLOAdamW"}
MIN_8BIT_SIZE, BLOCK = 4096, 256  # bitsandbytes' defaults, which slimtrain's 8-bit state follows


def moment_bytes(numel: int, eight_bit: bool) -> int:
    """Bytes of one Adam moment of ``numel`` elements."""
    if eight_bit and numel >= MIN_8BIT_SIZE:
        return numel + 4 * -(-numel // BLOCK)
    return 4 * numel


def expected_bytes(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> tuple[int, int]:
    """(moments, basis or factors) in bytes, from shapes alone."""
    eight_bit = name.endswith("8bit")
    method = name.removesuffix("8bit")
    projected = {id(p) for g in optimizer.param_groups if "rank" in g for p in g["params"] if p.dim() == 2}
    moments = basis = 0
    for p in model.parameters():
        if id(p) not in projected:
            moments += 2 * moment_bytes(p.numel(), eight_bit)
            continue
        m, n = p.shape
        d, big = min(m, n), max(m, n)
        r = round(DEFAULTS["frugal"]["density"] * d) if method == "frugal" else rank
        if method == "sst":
            moments += 2 * moment_bytes(d, eight_bit) + 2 * moment_bytes(r * m, eight_bit) + 2 * moment_bytes(r * n, eight_bit)
            basis += 4 * (m * d + n * d + d) + 8 * r  # factors and the sampled indices
            continue
        moments += 2 * moment_bytes(big * r, eight_bit)
        basis += 8 * r if method == "dct" else 4 * r * d
    return moments, basis


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--rank", type=int, default=None, help="default: a quarter of the hidden size")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZER_NAMES + REFERENCE_NAMES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the tiny model")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results (--quick: runs/benchmarks-quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.model = "tiny"
    args.out_dir = args.out_dir or results_dir(args.quick)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line(__file__, argv)
    config = model_config(args.model, 256, 64)
    rank = args.rank or default_rank(smallest_matrix_dim(config))
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (2, 33))
    rows = []
    for name in args.optimizers:
        model = build_model(config, seed=0)
        try:
            optimizer = build_optimizer(name, model, rank=rank)
        except RuntimeError as e:  # a slimtrain optimizer that does not exist yet
            rows.append(dict(name=name, available=False, note=str(e)))
            continue
        logits = model(input_ids=batch[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
        optimizer.step()
        measured = state_tensor_bytes(optimizer)
        own = int(optimizer.state_bytes()) if hasattr(optimizer, "state_bytes") else None
        moments, basis = expected_bytes(name, model, optimizer, rank) if name != "adamw" else (
            sum(2 * 4 * p.numel() for p in model.parameters()), 0)
        rows.append(dict(name=name, available=True, measured=measured, own=own, moments=moments, basis=basis))
    n_params = sum(p.numel() for p in build_model(config, 0).parameters())
    write_report(args, command, rows, n_params, rank)
    return rows


def write_report(args, command: str, rows: list[dict], n_params: int, rank: int) -> None:
    adamw = next((r for r in rows if r["name"] == "adamw" and r["available"]), None)
    mib = 2**20
    lines = [
        "# Optimizer state memory after one step",
        "",
        "```",
        command,
        "```",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}. "
        f"Model `{args.model}` LLaMA ({n_params / 1e6:.2f}M parameters, byte vocabulary, untied lm_head); "
        f"low-rank optimizers project the attention and MLP matrices at rank {rank} (FRUGAL: density "
        f"{DEFAULTS['frugal']['density']} of min(m, n)), everything else gets AdamW moments. "
        "Bytes are the sum over distinct tensors reachable from `optimizer.state`; the expectation is "
        "computed from shapes (see the script's docstring).",
        "",
        "| optimizer | implementation | measured MiB | / AdamW | expected moments MiB | expected basis / factors MiB "
        "| expected total MiB | other (measured - expected) bytes | `state_bytes()` agrees |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        impl = IMPLEMENTATION.get(r["name"], f"slimtrain {r['name']}")
        if not r["available"]:
            lines.append(f"| {r['name']} | {impl} | not available | - | - | - | - | - | - |")
            continue
        expected = r["moments"] + r["basis"]
        ratio = f"{r['measured'] / adamw['measured']:.3f}" if adamw else "-"
        agrees = "-" if r["own"] is None else ("yes" if r["own"] == r["measured"] else f"no ({r['own']:,})")
        lines.append(
            f"| {r['name']} | {impl} | {r['measured'] / mib:.3f} | {ratio} | {r['moments'] / mib:.3f} | "
            f"{r['basis'] / mib:.3f} | {expected / mib:.3f} | {r['measured'] - expected:,} | {agrees} |"
        )
    lines.append("")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "state_memory.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
