"""Communication and per-rank optimizer state under DeepSpeed ZeRO, slimtrain optimizers vs ZeRO AdamW.

Question: what does the sharded low-rank step cost in communication per step and per projector
refresh, and how much optimizer state does each rank hold with 1 and 2 ranks?

Every collective issued during a step is counted: DeepSpeed's own through its comms logger (message
size as DeepSpeed records it), slimtrain's gather/scatter and flags through the optimizer's own counter
(bytes of the buffer each rank sends; the padded width for gather/scatter), summed over calls and
averaged over ranks. Steps 0 and 5 are refresh steps (``update_proj_gap=5``); the
table splits them from ordinary steps. The model is a small LLaMA (4 layers, hidden 128) on random
tokens; the state sizes do not depend on the data.

    python -m benchmarks.zero                  # writes benchmarks/results/zero.md (about 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections import defaultdict

import torch
import torch.multiprocessing as mp

from benchmarks._cli import command_line, invocation

STEPS = 7
GAP = 5
OPTIMIZERS = ["adamw", "galore", "fira", "frugal", "dct"]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _optimizer(name, model):
    from slimtrain.optimizers import OPTIMIZERS as OPT
    from slimtrain.optimizers import low_rank_param_groups

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    groups = low_rank_param_groups(model, ["self_attn", "mlp"], rank=32, update_proj_gap=GAP, scale=0.25)
    return OPT[name](groups, lr=1e-3)


def worker(rank, world, port, stage, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import deepspeed
    import deepspeed.ops as dops
    import torch.distributed as dist

    dops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    from slimtrain import sharding

    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "steps_per_print": 10_000, "zero_allow_untested_optimizer": True,
              # DeepSpeed's own collectives, with their message sizes, from its comms logger.
              "comms_logger": {"enabled": True, "prof_all": True, "verbose": False, "debug": False}}
    import deepspeed.comm as dscomm

    def deepspeed_bytes() -> int:
        return sum(size * rec[0] for ops in dscomm.comms_logger.comms_dict.values() for size, rec in ops.items())

    for name in OPTIMIZERS:
        model = _model()
        opt = _optimizer(name, model)
        if name == "adamw":
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        else:
            engine, *_ = sharding.initialize(model=model, optimizer=opt, config=config)
        per_step = []
        g = torch.Generator().manual_seed(rank)
        inner = engine.optimizer.optimizer
        ours = getattr(inner, "comm", None)  # the collectives slimtrain issues (gather/scatter, flags)
        t0 = time.perf_counter()
        for step in range(STEPS):
            ids = torch.randint(0, 256, (4, 32), generator=g)
            before = deepspeed_bytes() + (ours.bytes_sent if ours else 0)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            per_step.append(deepspeed_bytes() + (ours.bytes_sent if ours else 0) - before)
        elapsed = (time.perf_counter() - t0) / STEPS
        state = inner.state_bytes() if hasattr(inner, "state_bytes") else _torch_state_bytes(inner)
        queue.put((rank, name, per_step, state, elapsed))


def _torch_state_bytes(opt):
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, stage):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, stage, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = defaultdict(dict)
    for _ in range(world * len(OPTIMIZERS)):
        rank, name, per_step, state, elapsed = queue.get(timeout=900)
        out[name][rank] = (per_step, state, elapsed)
    for p in procs:
        p.join()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "zero.md"))
    args = parser.parse_args(argv)
    rows = []
    for stage in args.stages:
        one = run(1, stage)
        two = run(2, stage)
        base2 = two["adamw"]
        base_step = sum(sum(base2[r][0][s] for s in range(STEPS) if s % GAP) / (STEPS - 2) for r in (0, 1)) / 2
        for name in OPTIMIZERS:
            ranks = two[name]
            step_bytes = sum(sum(ranks[r][0][s] for s in range(STEPS) if s % GAP) / (STEPS - 2) for r in (0, 1)) / 2
            refresh_bytes = sum(ranks[r][0][GAP] for r in (0, 1)) / 2
            state1 = one[name][0][1]
            state2 = [ranks[r][1] for r in (0, 1)]
            rows.append((stage, name, step_bytes, step_bytes / base_step, refresh_bytes, state1, state2,
                         max(state2) / state1, sum(ranks[r][2] for r in (0, 1)) / 2))
    lines = [
        "# ZeRO: communication and per-rank optimizer state",
        "",
        f"Produced by `{command_line(__file__, argv)}` (2 CPU cores, gloo; LLaMA 4 layers x hidden 128, rank 32,",
        f"`update_proj_gap={GAP}`, micro-batch 4 x 32 tokens). Bytes: message sizes of every collective a rank",
        "issues in a step, DeepSpeed's from its comms logger and slimtrain's from its own counter, averaged over",
        "the 2 ranks; 'ordinary' excludes the refresh steps 0 and 5.",
        "",
        "| ZeRO | optimizer | bytes/step (ordinary) | vs ZeRO AdamW | bytes at a refresh step | state, 1 rank | state per rank, 2 ranks | max rank / 1 rank | s/step (2 ranks) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, name, step_b, ratio, ref_b, s1, s2, share, sec in rows:
        lines.append(f"| {stage} | {name} | {step_b / 1e6:.2f} MB | {ratio:.2f}x | {ref_b / 1e6:.2f} MB | {s1 / 1e6:.2f} MB | "
                     f"{s2[0] / 1e6:.2f} / {s2[1] / 1e6:.2f} MB | {share:.2f} | {sec:.2f} |")
    lines += [
        "",
        "Reading it: the low-rank optimizers send each projected matrix's gradient to its owner and the update back",
        "(one gather and one scatter per owner per step), on top of ZeRO's own traffic, so their per-step bytes are",
        "a multiple of ZeRO AdamW's; refreshes happen at the owner and add nothing. Per-rank state is the",
        "low-rank state of the matrices a rank owns plus its ZeRO slice of the element-wise state.",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
