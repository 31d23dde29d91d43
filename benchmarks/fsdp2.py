"""Communication, per-rank optimizer state, gradient memory and time under FSDP2, slimtrain's optimizers vs FSDP2 +
torch AdamW.

Question: how many bytes does a step of each slimtrain optimizer move on ``fully_shard`` models, against FSDP2's
own traffic with torch's AdamW (ordinary steps, and with refreshes amortized at ``update_proj_gap = 200``), how
much optimizer state does each rank hold against one process, how much sharded gradient memory does layer-wise
stepping hold against ``optimizer.step()``, and how long is a step?

Every collective issued during a step is counted by :class:`slimtrain.sharding.CollectiveCounter` (FSDP2's
all-gathers and reduce-scatters and slimtrain's own collectives alike, as the bytes each rank receives under ring
algorithms; see ``slimtrain/sharding/traffic.py``), averaged over ranks. The model is a small LLaMA (4 layers,
hidden 128, intermediate 344, vocabulary 256) on random tokens, rank 32, with refreshes at steps 0 and ``--gap``;
'vs AdamW, T = 200' puts one refresh step among 200 ordinary ones. Each configuration runs under both
placements: ``low-rank`` (:func:`slimtrain.sharding.low_rank_placement`: the wide matrices by columns) and
``rows`` (FSDP2's default), each compared with AdamW under the same placement.

    python -m benchmarks.fsdp2                   # writes benchmarks/results/fsdp2.md (about 15 minutes on 2 CPU cores)
    python -m benchmarks.fsdp2 --worlds 2 --optimizers galore --steps 3 --gap 2 --out /tmp/fsdp2.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks._cli import command_line, invocation

#: label -> (recipe optimizer name, extra constructor options)
CONFIGS = {
    "adamw": ("adamw", {}),
    "galore": ("galore", {}),
    "galore-bf16-basis": ("galore", {"projector": "svd-bf16"}),
    "galore8bit": ("galore8bit", {}),
    "fira": ("fira", {}),
    "frugal": ("frugal", {}),
    "frugal-block": ("frugal-block", {}),
    "dct": ("dct", {}),
    "dct8bit": ("dct8bit", {}),
    "sst": ("sst", {}),
    "apollo": ("apollo", {}),
    "apollo-mini": ("apollo-mini", {}),
}
PLACEMENTS = ["low-rank", "rows"]
RANK = 32
AMORTIZE = 200  # the papers' update_proj_gap
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def build(label: str, placement: str, gap: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from slimtrain.optimizers.projectors import SVDProjector
    from slimtrain.recipes.optim import build_optimizer
    from slimtrain.sharding import low_rank_placement

    net = model()
    if dist.get_world_size() > 1:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        place = low_rank_placement(mesh=mesh) if placement == "low-rank" else None
        for layer in net.model.layers:
            fully_shard(layer, mesh=mesh, shard_placement_fn=place)
        fully_shard(net, mesh=mesh, shard_placement_fn=place)
    name, extra = CONFIGS[label]
    extra = dict(extra)
    if extra.get("projector") == "svd-bf16":
        extra["projector"] = SVDProjector(basis_dtype="bf16")
    if name != "adamw":
        extra.update(update_proj_gap=gap)
    if name not in ("adamw", "apollo-mini"):  # APOLLO-Mini is defined at rank 1
        extra.update(rank=RANK)
    return net, build_optimizer(name, net, **extra)


def grad_bytes(net) -> int:
    """Bytes of the storage behind every gradient the parameters hold (this rank's pieces)."""
    storages = {}
    for p in net.parameters():
        if p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            storages[grad.untyped_storage().data_ptr()] = grad.untyped_storage().nbytes()
    return sum(storages.values())


def worker(args) -> None:
    """One rank: :func:`measure`, gathered to rank 0, which writes them to ``args.json``."""
    import torch.distributed as dist

    from slimtrain.sharding import leave_process_group

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, measure(args))
    if dist.get_rank() == 0:
        with open(args.json, "w") as f:
            json.dump(everyone, f)
    leave_process_group()


def measure(args) -> tuple[list, dict]:
    """Every configuration, its bytes per step by origin, its state on this rank, its time per step; then the peak
    gradient bytes of GaLore stepped with ``optimizer.step()`` and layer-wise."""
    import torch.distributed as dist

    from slimtrain.optimizers import LayerwiseStepper
    from slimtrain.recipes.optim import optimizer_state_bytes
    from slimtrain.sharding import CollectiveCounter

    rank, world = dist.get_rank(), dist.get_world_size()
    results, memory = [], {}
    for label in args.optimizers:
        for placement in PLACEMENTS if world > 1 else PLACEMENTS[:1]:
            net, opt = build(label, placement, args.gap)
            g = torch.Generator().manual_seed(rank)
            steps, seconds = [], 0.0
            for step in range(args.steps):
                ids = torch.randint(0, 256, (4, 32), generator=g)
                dist.barrier()
                t0 = time.perf_counter()
                with CollectiveCounter() as counter:
                    net(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad()
                seconds += time.perf_counter() - t0 if step else 0.0  # step 0 builds the state
                steps.append(counter.bytes_by_origin())
            results.append(dict(label=label, placement=placement, steps=steps, state=optimizer_state_bytes(opt),
                                seconds=seconds / (args.steps - 1)))
    if world > 1:
        for mode in ("step", "layer-wise"):
            net, opt = build("galore", "low-rank", args.gap)
            peak = [0]
            for p in net.parameters():  # before the stepper's hooks, which free each gradient
                p.register_post_accumulate_grad_hook(lambda p: peak.__setitem__(0, max(peak[0], grad_bytes(net))))
            stepper = LayerwiseStepper(opt, model=net) if mode == "layer-wise" else None
            ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(rank))
            for _ in range(2):
                net(input_ids=ids, labels=ids).loss.backward()
                peak[0] = max(peak[0], grad_bytes(net))
                if stepper is None:
                    opt.step()
                    opt.zero_grad()
            memory[mode] = peak[0]
    return results, memory


def launch(world: int, args) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   "-m", "benchmarks.fsdp2", "--worker", "--json", out, "--steps", str(args.steps), "--gap",
                   str(args.gap), "--optimizers", *args.optimizers]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
        subprocess.run(command, cwd=ROOT, env=env, check=True)
        with open(out) as f:
            return json.load(f)


def summarize(per_rank: list, gap: int) -> tuple[dict, dict]:
    """``({(label, placement): row}, {mode: peak gradient bytes, max over ranks})``, rows averaged over ranks:
    ordinary and refresh bytes (total and slimtrain's), state per rank, seconds per step."""
    rows = {}
    for i, first in enumerate(per_rank[0][0]):
        ranks = [results[i] for results, _ in per_rank]
        ordinary = [s for s in range(len(first["steps"])) if s % gap]

        def mean_bytes(steps, origin=None):
            return sum(sum(v for o, v in r["steps"][s].items() if origin in (None, o)) for r in ranks
                       for s in steps) / (len(ranks) * len(steps))

        rows[(first["label"], first["placement"])] = dict(
            ordinary=mean_bytes(ordinary), ordinary_ours=mean_bytes(ordinary, "slimtrain"), refresh=mean_bytes([gap]),
            state=[r["state"] for r in ranks], seconds=sum(r["seconds"] for r in ranks) / len(ranks))
    memory = {mode: max(m[mode] for _, m in per_rank) for mode in per_rank[0][1]}
    return rows, memory


def table(worlds: dict, one: dict) -> list[str]:
    lines = ["| ranks | placement | optimizer | bytes/step (ordinary) | slimtrain's | vs AdamW | refresh step | "
             f"vs AdamW, T = {AMORTIZE} | state, 1 process | state per rank | max rank / 1 process | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for world, (rows, _) in worlds.items():
        for (label, placement), row in rows.items():
            base = rows[("adamw", placement)]
            amortized = row["ordinary"] + (row["refresh"] - row["ordinary"]) / AMORTIZE
            base_amortized = base["ordinary"] + (base["refresh"] - base["ordinary"]) / AMORTIZE
            single = one[(label, "low-rank")]["state"][0]
            per_rank = " / ".join(f"{s / 1e6:.3f}" for s in row["state"])
            lines.append(
                f"| {world} | {placement} | {label} | {row['ordinary'] / 1e6:.3f} MB | {row['ordinary_ours'] / 1e3:.1f} kB | "
                f"{row['ordinary'] / base['ordinary']:.4f}x | {row['refresh'] / 1e6:.3f} MB | "
                f"{amortized / base_amortized:.4f}x | {single / 1e6:.3f} MB | {per_rank} MB | "
                f"{max(row['state']) / single:.3f} | {row['seconds']:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3], help="numbers of ranks (default: 2 3)")
    parser.add_argument("--optimizers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                        help=f"configurations (default: all: {', '.join(CONFIGS)}; AdamW is always run)")
    parser.add_argument("--steps", type=int, default=7, help="steps per configuration (default: 7)")
    parser.add_argument("--gap", type=int, default=5, help="update_proj_gap: refreshes at 0 and GAP (default: 5)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fsdp2.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if "adamw" not in args.optimizers:
        args.optimizers = ["adamw", *args.optimizers]
    if not 2 <= args.gap < args.steps:
        parser.error(f"--gap {args.gap} must be at least 2 (an ordinary step to measure) and below --steps {args.steps} "
                     "(a refresh step to measure)")
    if any(w < 2 for w in args.worlds):
        parser.error(f"--worlds {args.worlds}: each at least 2 (one process is always run, as the reference)")
    one, _ = summarize(launch(1, args), args.gap)
    worlds = {w: summarize(launch(w, args), args.gap) for w in args.worlds}
    lines = [
        "# FSDP2: communication, per-rank optimizer state, gradient memory and time",
        "",
        f"Produced by `{command_line(__file__, argv)}` (2 CPU cores, gloo; LLaMA 4 layers x hidden 128 x",
        f"intermediate 344, rank {RANK}, `update_proj_gap={args.gap}`, micro-batch 4 x 32 tokens per rank). Bytes: what",
        "each rank receives in every collective of a step (FSDP2's and slimtrain's), under ring algorithms, averaged",
        "over ranks (`slimtrain/sharding/traffic.py`); 'ordinary' leaves out the refresh steps; 'slimtrain's' is the part",
        f"slimtrain issued; 'vs AdamW, T = {AMORTIZE}' puts one refresh step among {AMORTIZE}. State: the bytes of optimizer",
        "state each rank holds (its pieces of split tensors, and what it keeps whole), against the same optimizer in",
        "one process. Seconds per step on a 2-core machine shared with other jobs: read them as rough.",
        "",
        *table(worlds, one),
        "",
        "Peak bytes of sharded gradients a rank holds (GaLore, `low-rank` placement; the storage behind the gradients,",
        "measured at every gradient hook and after each backward pass):",
        "",
        "| ranks | optimizer.step() | layer-wise (LayerwiseStepper) |",
        "|---|---|---|",
        *(f"| {w} | {m['step'] / 1e6:.3f} MB | {m['layer-wise'] / 1e6:.3f} MB |" for w, (_, m) in worlds.items()),
        "",
        "Reading it (`docs/fsdp.md` explains the design): a matrix whose sharded dimension its projection does not",
        "contract (row-local) costs no message of slimtrain's in an ordinary step; `low-rank` makes every wide matrix",
        "row-local where the number of ranks divides its width, and `rows` leaves the wide ones (LLaMA's `down_proj`)",
        "contracted, paying a reduce-scatter and an all-gather of their `max(m, n) x r` products every step. The 8-bit",
        "twins add one `MAX` all-reduce of each 8-bit moment's block scales; Fira and APOLLO a scalar (their limiters'",
        "norms), APOLLO-Mini also two scalars in one (its tensor-wise norms); SST the all-reduce of `G^T U_S` (`n x r`) and of the",
        "singular values' gradient. A refresh gathers each matrix's gradient to its owner (SVD), all-reduces column",
        "scores (DCT) or sends nothing (APOLLO's seeded random projection). State per rank is each rank's rows of the",
        "moments plus what every rank keeps whole: an SVD basis (`r x n`, fp32 unless `basis_dtype=\"bf16\"`), DCT's",
        "indices, the 8-bit block scales, SST's other factor; FRUGAL's block mode and APOLLO keep nothing whole but",
        "counters and a seed.",
    ]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
