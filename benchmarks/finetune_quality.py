"""Which adapter learns the finetune recipe's task best, for how many parameters and bytes?

The task of ``slimtrain.recipes.finetune``: MiniLM-L6 classifies a Shakespeare passage as comedy,
history or tragedy (First Folio), tested on whole plays held out from training. Every method gets the
same plays, passages, steps, batch order and seed; only the adapter and its learning rate
(``slimtrain.adapters.presets``) differ. PEFT's LoRA, LoRA+DoRA and RandLora run next to slimtrain's NOLA,
RandLoRA, DoRA, LoLDU and S2FT, all rank 8 on query/value (RandLoRA r 32; S2FT on value and
attention output).

    python -m benchmarks.finetune_quality                    # ~15 min on 2 shared CPU cores
    python -m benchmarks.finetune_quality --quick            # seconds per method, a smoke test

Shorter than the recipe's default run (200 steps of 48-word passages) to fit eight methods in about 15
minutes on a shared 2-core machine: 60 steps of 16 passages of 32 words (about 45 tokens, cut at 64),
30 passages per held-out play.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks._cli import command_line, invocation, results_dir  # noqa: E402
from slimtrain.adapters.presets import PRESETS  # noqa: E402
from slimtrain.recipes import finetune as F  # noqa: E402

METHODS = ("lora", "lora-dora", "peft-randlora", "nola", "randlora", "dora", "loldu", "s2ft")
LABEL = {"lora": "PEFT LoRA r8", "lora-dora": "PEFT LoRA+DoRA r8", "peft-randlora": "PEFT RandLora r32",
         "nola": "slimtrain NOLA r8 k=l=64", "randlora": "slimtrain RandLoRA r32", "dora": "slimtrain DoRA r8",
         "loldu": "slimtrain LoLDU r8", "s2ft": "slimtrain S2FT"}
DEFAULT = dict(steps=60, words=32, max_length=64, test_passages=30, batch_size=16)
QUICK = dict(steps=3, words=16, max_length=32, test_passages=2, batch_size=4, max_train_passages=24)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 steps on 24 passages: checks the script, not the methods")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default: {DEFAULT['steps']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results (--quick: runs/benchmarks-quick)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or results_dir(args.quick)
    return args


def _cfg(args, method: str, out: str):
    setting = dict(QUICK if args.quick else DEFAULT)
    if args.steps is not None:
        setting["steps"] = args.steps
    argv = ["--adapter", method, "--out", out, "--seed", str(args.seed), "--no-progress"]
    for k, v in setting.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return F.validate(F.parse_args(argv), allowed_adapters=tuple(PRESETS)), setting


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Invalid --methods: {', '.join(map(repr, unknown))} (expected some of {', '.join(METHODS)})")
    command = command_line(__file__, argv)
    scratch = tempfile.mkdtemp(prefix="finetune_quality_")
    rows, data, setting = [], None, None
    try:
        for method in args.methods:
            cfg, setting = _cfg(args, method, os.path.join(scratch, method))
            data = F.load_data(cfg) if data is None else data  # same plays, passages and order for all
            t0 = time.perf_counter()
            r = F.run(cfg, data)
            r["wall_s"] = time.perf_counter() - t0
            r["name"] = LABEL[method]
            rows.append(r)
            print(f"{LABEL[method]}: acc {r['test_accuracy']:.3f}, {r['trainable_params']:,} params, "
                  f"{r['adapter_bytes'] / 1024:.1f} KiB, {r['wall_s']:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_report(os.path.join(args.out_dir, "finetune_quality.md"), command, cfg, setting, data, rows)
    return rows


def write_report(path, command, cfg, setting, data, rows) -> None:
    import peft
    import torch
    import transformers

    lines = [
        "# Fine-tuning quality: Shakespeare genre of held-out plays, MiniLM-L6",
        "",
        f"Command: `{command}`",
        "",
        f"Environment: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"{platform.machine()}, {cfg.threads} thread(s), CPU, a 2-core machine shared with other jobs (wall times "
        "are indicative only).",
        "",
        f"Setting (the same for every row): {setting['steps']} steps x {setting['batch_size']} passages of "
        f"{setting['words']} words (cut at {setting['max_length']} tokens), seed {cfg.seed}, linear schedule with "
        f"10 % warm-up; {len(data['train'])} training passages balanced over the three genres from "
        f"{len(cfg.train_plays)} plays; test: {len(data['test'])} passages, {setting['test_passages']} per held-out "
        f"play, from {len(cfg.test_plays)} plays never seen in training ({', '.join(cfg.test_plays)}). "
        "Chance is 1/3; the majority class of the test set is "
        f"{rows[0]['majority_baseline']:.3f}." if rows else "",
        "",
        "Accuracy: share of test passages classified right; balanced: mean of the three per-genre accuracies; "
        "plays: held-out plays whose majority vote over their passages is right. Trainable: adapter + the new "
        f"3-way head ({rows[0]['head_params'] if rows else 0:,} of them). File: the `save_pretrained` directory on "
        "disk (weights + config). Learning "
        "rate: the recipe's per-method default (`slimtrain.adapters.presets`); no tuning per method, so a low row may "
        "mean a poor learning rate rather than a poor method.",
        "",
        "| method | lr | test acc | balanced | plays right | trainable | file | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        right = round(r["play_accuracy"] * len(r["per_play_prediction"]))
        lines.append(
            f"| {r['name']} | {PRESETS[r['adapter']].lr:g} | {r['test_accuracy']:.3f} | {r['balanced_accuracy']:.3f} | "
            f"{right}/{len(r['per_play_prediction'])} | {r['trainable_params']:,} | {r['adapter_bytes'] / 1024:,.1f} KiB | "
            f"{r['wall_s']:.0f} s |"
        )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
