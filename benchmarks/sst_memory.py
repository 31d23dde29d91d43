"""Does SST in the paper's form (weights replaced by their factors) train in less memory than AdamW?

For each model shape, one training step (same seeded model, same batch) with:

- ``torch.optim.AdamW`` on the dense model;
- ``SSTAdamW``, SST in optimizer form (factors kept as state beside the weight);
- ``SpectralSSTAdamW`` on the model converted by ``to_spectral`` (attention and MLP Linears; embeddings,
  norms and lm_head stay dense under AdamW), rank a quarter of the smallest matrix dimension (the
  paper's 60M ratio, 128 of 512);

and after the step counts the bytes actually held: weights (parameters and buffers: a spectral layer's
frozen factors are buffers), gradients (every ``.grad``) and optimizer state (every tensor in
``optimizer.state``). "Saved activations" are the bytes autograd kept for the backward of that batch
(distinct storages seen by ``saved_tensors_hooks``, weights and buffers excluded): not part of the target, shown because the
spectral layer saves ``x V`` (d per token) beside ``x``.

    python -m benchmarks.sst_memory             # tiny and 60m at the byte vocabulary, 60m at 32k; ~1 min
    python -m benchmarks.sst_memory --quick     # tiny only
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.nn.functional as F

from benchmarks._cli import command_line, invocation, results_dir
from slimtrain.optimizers import SpectralSSTAdamW, to_spectral
from slimtrain.recipes.models import build_model, model_config, smallest_matrix_dim
from slimtrain.recipes.optim import TARGET_MODULES, build_optimizer, default_rank, optimizer_state_bytes

CASES = [("tiny", 256), ("60m", 256), ("60m", 32000)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny model only")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results (--quick: runs/benchmarks-quick)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or results_dir(args.quick)
    return args


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> dict:
    storages: dict[int, int] = {}
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    def pack(t):  # weights that autograd saves are counted under weights, not here
        if t.numel() and t.untyped_storage().data_ptr() not in held:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    t0 = time.perf_counter()
    loss.backward()
    optimizer.step()
    step_s = time.perf_counter() - t0
    weights = _bytes(model.parameters()) + _bytes(model.buffers())
    grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
    state = optimizer_state_bytes(optimizer)
    return dict(weights=weights, grads=grads, state=state, total=weights + grads + state,
                activations=sum(storages.values()), step_s=step_s)


def run_case(shape: str, vocab: int, args) -> list[dict]:
    config = model_config(shape, vocab, args.seq_len)
    rank = default_rank(smallest_matrix_dim(config))
    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in ("adamw", "sst", "spectral"):
        model = build_model(config, seed=0)
        if name == "adamw":
            opt = build_optimizer("adamw", model)
            label = "torch.optim.AdamW"
        elif name == "sst":
            opt = build_optimizer("sst", model, rank=rank)
            label = "SSTAdamW (optimizer form)"
        else:
            to_spectral(model, TARGET_MODULES, rank)
            opt = SpectralSSTAdamW(model, lr=1e-3)
            label = "SpectralSSTAdamW (to_spectral)"
        rows.append(dict(shape=shape, vocab=vocab, rank=rank, label=label, **measure(model, opt, ids)))
        print(f"[sst_memory] {shape} vocab {vocab} {label}: total {rows[-1]['total'] / 2**20:.1f} MiB", flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line(__file__, argv)
    t0 = time.perf_counter()
    rows = [r for shape, vocab in (CASES[:1] if args.quick else CASES) for r in run_case(shape, vocab, args)]
    mib = 2**20
    lines = [
        "# SST memory: the paper's re-parameterized form vs AdamW",
        "",
        "```",
        command,
        "```",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores "
        f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s)); {time.perf_counter() - t0:.0f} s in all. "
        f"One step, batch {args.batch_size} x {args.seq_len} tokens, fp32. Bytes held after the step: weights "
        "(parameters + buffers), gradients, optimizer state. Spectral: attention and MLP Linears converted by "
        "`to_spectral` at the rank shown; embeddings, norms and lm_head dense under AdamW in every row.",
        "",
        "| model | vocab | rank | optimizer | weights MiB | grads MiB | state MiB | **total MiB** | total / AdamW "
        "| saved activations MiB | step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = next(x for x in rows if (x["shape"], x["vocab"]) == (r["shape"], r["vocab"]) and x["label"].startswith("torch"))
        lines.append(
            f"| {r['shape']} | {r['vocab']} | {r['rank']} | {r['label']} | {r['weights'] / mib:.2f} | "
            f"{r['grads'] / mib:.2f} | {r['state'] / mib:.2f} | **{r['total'] / mib:.2f}** | "
            f"{r['total'] / ref['total']:.3f} | {r['activations'] / mib:.1f} | {r['step_s']:.2f} |"
        )
    lines += [
        "",
        "Per converted m x n matrix (d = min(m, n), r sampled pairs) the spectral form holds (m + n) d + d weights, "
        "(m + n) r + d gradients and 2 (m + n) r + 2 d state, against AdamW's m n, m n and 2 m n: see "
        "`slimtrain/optimizers/spectral.py`. The factors of a rectangular matrix are larger than the matrix "
        "((m + n) d > m n), so the saving comes from the gradients and state alone. Step times are one step on a "
        "shared CPU, indicative only.",
        "",
    ]
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "sst_memory.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
