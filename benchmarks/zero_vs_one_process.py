"""How close 2 ZeRO-2 ranks come to one process, and why they differ: the numbers the README's DeepSpeed
paragraph and docs/sharding.md cite.

Three runs of the same 4-step GaLore pre-training (tiny LLaMA, batches of 4 x 32 bytes, evaluation every 2
steps, on the first 20,000 characters of three Shakespeare texts), at rank 8 and at the default rank 48:

- ``one process``: ``slimtrain pretrain``;
- ``2 ranks``: the DeepSpeed recipe, ZeRO-2, 2 CPU ranks over gloo: each rank averages its half of the
  batch, and DeepSpeed averages the two means;
- ``halves``: one process without DeepSpeed whose gradient is the mean of the two half-batch gradients,
  the arithmetic of the 2-rank run without the sharding.

If ``halves`` reproduces ``2 ranks``, the gap to ``one process`` comes from the split batch (a mean of
means in fp32), not from the sharding.

    DS_ACCELERATOR=cpu python -m benchmarks.zero_vs_one_process   # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

import torch

from benchmarks._cli import command_line, invocation
from slimtrain.recipes import metrics, pretrain
from slimtrain.recipes.shakespeare import shakespeare_files

RANKS = (8, 48)
STEPS = 4


def _corpus(directory: str) -> list[str]:
    paths = []
    for src in shakespeare_files()[:3]:
        path = os.path.join(directory, os.path.basename(src))
        with open(src, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as g:
            g.write(f.read()[:20000])
        paths.append(path)
    return paths


def _args(corpus: list[str], rank: int, out: str) -> list[str]:
    return ["--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--no-progress",
            "--data", *corpus, "--optimizer", "galore", "--rank", str(rank), "--steps", str(STEPS),
            "--eval-every", "2", "--out", out]


def _losses(out: str) -> list[tuple[float, float | None]]:
    rows = metrics.read_metrics(os.path.join(out, metrics.METRICS))
    return [(float(r["train_loss"]), float(r["val_loss"]) if r["val_loss"] not in ("", None) else None) for r in rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(args: list[str]) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
               str(_free_port()), "--module", "slimtrain.recipes.deepspeed", *args, "--zero", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the 2-rank run failed:\n{done.stderr[-3000:]}")


def halves(args: list[str]) -> list[tuple[float, float | None]]:
    """One process, the gradient the mean of the two half-batch gradients (what 2 ranks average)."""
    cfg = pretrain.validate(pretrain.parse_args(args))
    cfg.out = None
    splits, batches = pretrain.load_data(cfg)
    model, opt = pretrain.build_model_and_optimizer(cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, pretrain.lr_schedule(cfg))
    rows = []
    for step in range(STEPS):
        x, y = batches.batch(step)
        grads, loss = [], 0.0
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            half = pretrain.next_byte_loss(model, xs, ys)
            half.backward()
            loss += half.item() / 2
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.zero_grad()
        for p, a, b in zip(model.parameters(), *grads):
            p.grad = (a + b) / 2
        opt.step()
        sched.step()
        opt.zero_grad()
        val = pretrain.evaluate(model, splits.val, cfg.batch_size, cfg.seq_len, 1) if (step + 1) % 2 == 0 else None
        rows.append((loss, val))
    return rows


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def main(argv=None):
    parser = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "zero_vs_one_process.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    accelerator = os.environ.get("DS_ACCELERATOR")
    command = command_line(__file__, argv, env=f"DS_ACCELERATOR={accelerator}" if accelerator else "")
    lines = [
        "# 2 ZeRO-2 ranks vs one process (GaLore, tiny LLaMA)",
        "",
        f"Produced by `{command}` (CPU, torch "
        f"{torch.__version__}). Losses in nats per byte; validation every 2 steps. `halves` is one process stepping "
        "on the mean of the two half-batch gradients.",
        "",
        "| rank | step | train: one process | train: 2 ranks | train: halves | val: one process | val: 2 ranks "
        "| val: halves | largest gap to one process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _corpus(tmp)
        for rank in RANKS:
            single_out, zero_out = os.path.join(tmp, f"single{rank}"), os.path.join(tmp, f"zero{rank}")
            pretrain.main(_args(corpus, rank, single_out))
            two_ranks(_args(corpus, rank, zero_out))
            rows = zip(_losses(single_out), _losses(zero_out), halves(_args(corpus, rank, os.path.join(tmp, "unused"))))
            for step, ((t1, v1), (t2, v2), (th, vh)) in enumerate(rows, 1):
                gap = max(abs(t2 - t1), abs(v2 - v1) if v1 is not None and v2 is not None else 0.0)
                line = (f"| {rank} | {step} | {_fmt(t1)} | {_fmt(t2)} | {_fmt(th)} | {_fmt(v1)} | {_fmt(v2)} | "
                        f"{_fmt(vh)} | {gap:.1e} |")
                lines.append(line)
                print(line, flush=True)
    lines.append("")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
