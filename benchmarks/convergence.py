"""How close does each low-rank optimizer get to AdamW on the same budget, and at what state size?

Trains the tiny LLaMA of the pretrain recipe on Shakespeare (byte-level, split by play) for the same
steps, batches, order and initial weights with:

- torch AdamW, its lr tuned over a small grid on this same budget (best final val loss is the
  reference for every ratio);
- each slimtrain optimizer at its paper defaults (slimtrain/recipes/optim.py: DEFAULTS); an optimizer
  that slimtrain does not have yet is reported "not available", never estimated;
- the published galore-torch GaLoreAdamW and apollo-torch APOLLOAdamW.

    python -m benchmarks.convergence                 # 10 runs x 250 steps: ~20 min on an idle core
                                                     # (0.4 s/step measured; far longer on a busy machine)
    python -m benchmarks.convergence --quick         # smoke run: 3 steps, seconds
    python -m benchmarks.convergence --optimizers galore8bit fira8bit frugal8bit dct8bit sst8bit \
        --adamw-lrs 0.001 --section "8-bit optimizer states"    # a second table, below the first
    python -m benchmarks.convergence --seeds 3               # every row over seeds 0, 1, 2: ~3x the time
    python -m benchmarks.convergence --optimizers frugal@0.003 frugal-block frugal-block@0.003 spectral-sst \
        --adamw-lrs 0.001 --section "FRUGAL modes and spectral SST"    # NAME@LR: that optimizer at lr LR

``--optimizers`` takes the recipe's names (``slimtrain pretrain --optimizer``) and the two references;
``NAME@LR`` runs NAME at peak lr LR instead of its default, and the table's lr column says so.

``--seeds N`` trains each row N times, with seeds ``--seed`` to ``--seed + N - 1`` (a seed sets the
initial weights and the batch order; the train/validation split stays the same), and reports the mean
final validation loss with the spread as min-max over the seeds, so that a difference between rows
can be read against the seed-to-seed variation. ``--seeds 1`` (the default) is the single-seed table.

Writes ``convergence.md`` (the command on top) and ``convergence.png`` into ``--out-dir``. With
``--section TITLE`` the run's table becomes a section of ``convergence.md`` (its own command on top,
curves in ``convergence-<title>.png``), replacing an earlier section of that title and keeping the
rest of the file; a run without ``--section`` replaces the main table and keeps the sections.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import time

import torch

from benchmarks._cli import command_line, invocation, results_dir
from slimtrain.recipes import metrics, pretrain
from slimtrain.recipes.models import build_model, model_config, smallest_matrix_dim
from slimtrain.recipes.optim import DEFAULTS, RECIPE_NAMES, REFERENCE_NAMES, check_optimizer_name, default_rank

SLIMTRAIN_LOW_RANK = ["galore", "fira", "frugal", "dct", "sst"]  # 8-bit twins: add with --optimizers
IMPLEMENTATION = {"adamw": "torch.optim.AdamW", "galore-torch": "galore_torch.GaLoreAdamW 1.0",
                  "apollo-torch": "apollo_torch.APOLLOAdamW",
                  "frugal-block": "slimtrain frugal, mode='block'", "frugal-block8bit": "slimtrain frugal8bit, mode='block'",
                  "spectral-sst": "slimtrain to_spectral + SpectralSSTAdamW"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per row, seeds --seed .. --seed+N-1; the table reports mean and min-max (default 1)")
    p.add_argument("--rank", type=int, default=None, help="default: a quarter of the hidden size")
    p.add_argument("--update-proj-gap", type=int, default=None, help="default: 200")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--optimizers", nargs="+", default=SLIMTRAIN_LOW_RANK + list(REFERENCE_NAMES),
                   metavar="NAME[@LR]", help="low-rank optimizers to compare with AdamW; NAME@LR sets the lr")
    p.add_argument("--section", default=None, metavar="TITLE",
                   help="write the table as a section of convergence.md, keeping the main table (e.g. 8-bit rows)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 steps of 2 x 32 bytes, one AdamW lr")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results (--quick: runs/benchmarks-quick)")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1 (got {args.seeds})")
    if args.quick:
        args.steps, args.batch_size, args.seq_len, args.eval_every, args.eval_batches = 3, 2, 32, 3, 1
        args.adamw_lrs = args.adamw_lrs[:1]
    args.out_dir = args.out_dir or results_dir(args.quick)
    return args


def parse_optimizer(text: str) -> tuple[str, float | None]:
    """``NAME`` or ``NAME@LR`` from ``--optimizers`` as (name, lr); lr None means the optimizer's default.

    Raises ``ValueError`` naming ``--optimizers`` for a malformed item, and ``check_optimizer_name``'s
    ``--optimizer`` error for an unknown name.
    """
    name, at, lr_text = text.partition("@")
    check_optimizer_name(name, RECIPE_NAMES + REFERENCE_NAMES)
    if not at:
        return name, None
    try:
        lr = float(lr_text)
    except ValueError:
        lr = math.nan
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"Invalid --optimizers: {text!r} (expected NAME or NAME@LR with LR a number > 0, e.g. frugal@0.003)")
    return name, lr


def seeds(args) -> list[int]:
    return list(range(args.seed, args.seed + args.seeds))


def recipe_config(args, optimizer: str, lr: float | None, seed: int | None = None) -> argparse.Namespace:
    cfg = pretrain.parse_args([
        "--model", args.model, "--optimizer", optimizer, "--steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-every", str(args.eval_every),
        "--eval-batches", str(args.eval_batches), "--seed", str(args.seed if seed is None else seed), "--threads", str(args.threads),
        "--out", "-", "--no-progress",
    ])
    cfg.out, cfg.lr, cfg.rank, cfg.update_proj_gap = None, lr, args.rank, args.update_proj_gap
    return pretrain.validate(cfg, allowed_optimizers=RECIPE_NAMES + REFERENCE_NAMES)


def available(name: str) -> bool:
    if name in ("adamw",) + REFERENCE_NAMES:
        return True
    from slimtrain.recipes.optim import slimtrain_optimizer_class

    try:
        slimtrain_optimizer_class(name)
    except RuntimeError:  # not in this slimtrain build
        return False
    return True


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    optimizers = [parse_optimizer(text) for text in args.optimizers]  # fail before the first run, not after an hour
    command = command_line(__file__, argv)
    os.makedirs(args.out_dir, exist_ok=True)
    # One split, and one batch order per seed, for all runs.
    data = {seed: pretrain.load_data(recipe_config(args, "adamw", None, seed)) for seed in seeds(args)}
    t_start = time.perf_counter()

    # The middle AdamW lr first and the rest of the grid last, and the table rewritten after every run:
    # if the benchmark is stopped early, what it has measured is already written (marked partial).
    grid = sorted(args.adamw_lrs)
    mid = grid[len(grid) // 2]
    jobs = [("adamw", mid)] + optimizers + [("adamw", lr) for lr in grid if lr != mid]
    rows = []
    for i, (name, lr) in enumerate(jobs):
        rows.append(_train(args, name, lr, data) if available(name) else dict(name=name, available=False))
        write_report(args, command, rows, time.perf_counter() - t_start, partial=i + 1 < len(jobs))
    return rows


def _train(args, name: str, lr: float | None, data: dict) -> dict:
    summaries = []
    for seed, seed_data in data.items():
        cfg = recipe_config(args, name, lr, seed)
        print(f"[convergence] {name} lr={cfg.lr if cfg.lr is not None else DEFAULTS[name]['lr']} seed {seed} ...", flush=True)
        summaries.append(pretrain.run(cfg, seed_data))
        print(f"[convergence]   val loss {summaries[-1]['final_val_loss']:.4f} in {summaries[-1]['elapsed_s']:.0f} s", flush=True)
    row = dict(name=name, available=True, lr=DEFAULTS[name]["lr"] if lr is None else lr, rank=cfg.rank, **summaries[0])
    if len(summaries) > 1:
        losses = [s["final_val_loss"] for s in summaries]
        mean = sum(losses) / len(losses)
        histories = [dict(s["val_history"]) for s in summaries]
        steps = [step for step, _ in summaries[0]["val_history"] if all(step in h for h in histories)]
        row.update(final_val_loss=mean, val_perplexity=math.exp(mean) if math.isfinite(mean) else math.inf,
                   seed_losses=losses, elapsed_s=sum(s["elapsed_s"] for s in summaries),
                   val_history=[(step, sum(h[step] for h in histories) / len(histories)) for step in steps])
    return row


def _loss_cell(r: dict) -> str:
    """The final validation loss: one seed's, or the mean over seeds with min-max in brackets."""
    if "seed_losses" not in r:
        return f"{r['final_val_loss']:.4f}"
    return f"{r['final_val_loss']:.4f} ({min(r['seed_losses']):.4f}-{max(r['seed_losses']):.4f})"


def _notes(args, best: dict) -> list[str]:
    notes = [
        "- Low-rank optimizers train the parameters they do not project (embeddings, norms, lm_head) with "
        "AdamW at the method's lr (0.01 for GaLore, Fira, DCT, APOLLO), as the papers' scripts do, while "
        "AdamW uses one lr for everything; on a budget this short that difference may account for part "
        "of any lead a low-rank optimizer shows over AdamW. It is not evidence that projecting helps.",
    ]
    grid = sorted(args.adamw_lrs)
    if len(grid) > 1 and best["lr"] in (grid[0], grid[-1]):
        notes.append(f"- The best AdamW lr ({best['lr']:g}) is at the edge of the grid; widen --adamw-lrs "
                     "to be sure it is the optimum.")
    return notes


def write_report(args, command: str, rows: list[dict], total_s: float, partial: bool = False) -> None:
    rows = sorted(rows, key=lambda r: r["name"] != "adamw")  # stable: AdamW grid first, then the given order
    adamw = [r for r in rows if r["name"] == "adamw"]
    best = min(adamw, key=lambda r: r["final_val_loss"] if math.isfinite(r["final_val_loss"]) else math.inf)
    config = model_config(args.model, 256, args.seq_len)
    n_params = sum(p.numel() for p in build_model(config, 0).parameters())
    tokens = args.steps * args.batch_size * args.seq_len
    if args.seeds == 1:
        seed_text = f"seed {args.seed}: the same initial weights and batch order for every row"
    else:
        seed_text = (f"seeds {', '.join(map(str, seeds(args)))} (each seed its own initial weights and batch order, "
                     "the same for every row): final val loss is the mean over the seeds with the min-max in "
                     "brackets; val ppl, ratios and curves use the mean; wall s is the total over the seeds")
    h = "#" if args.section is None else "##"  # a section sits one level below the main title
    png = "convergence.png" if args.section is None else f"convergence-{_slug(args.section)}.png"
    if len(args.adamw_lrs) > 1:
        reference = (f"AdamW lr tuned over {', '.join(f'{lr:g}' for lr in args.adamw_lrs)} on this budget; the best "
                     f"(lr {best['lr']:g}) is the reference for the ratio columns.")
    else:
        reference = f"AdamW at lr {best['lr']:g} (not tuned in this run) is the reference for the ratio columns."
    lines = [
        f"{h} {args.section or 'Convergence: low-rank optimizers vs AdamW on Shakespeare'}",
        "",
        *(["**Partial: the benchmark is still running or was stopped; rows below are the runs finished so far.**", ""]
          if partial else []),
        "```",
        command,
        "```",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU cores "
        f"(torch {torch.__version__}, torch threads: {torch.get_num_threads()}; other jobs shared the cores, so wall "
        f"times are indicative only). Total {total_s / 60:.1f} min.",
        "",
        f"Model `{args.model}` ({n_params / 1e6:.2f}M parameters, byte vocabulary), {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} bytes ({tokens / 1e6:.2f}M tokens), 10% warm-up then cosine to "
        f"10%, {seed_text}. Validation: "
        f"{args.eval_batches} batches of held-out plays, nats per byte. Low-rank optimizers project the "
        f"attention and MLP matrices (rank {args.rank or default_rank(smallest_matrix_dim(config))}, "
        f"T = {args.update_proj_gap or 200}); embeddings, norms and lm_head get AdamW inside the same optimizer.",
        "",
        f"{reference} Other optimizers use their papers' defaults, untuned: GaLore/Fira/DCT/galore-torch lr 0.01 "
        "scale 0.25; FRUGAL lr 1e-3 density 0.25; SST lr 1e-3; APOLLO lr 0.01 scale 1 (channel-wise, random "
        "projection). An `8bit` form takes its fp32 twin's defaults and keeps moments of >= 4096 elements in "
        f"8 bits (blockwise, 256 per block).{_variant_text(args)}",
        "",
        "| optimizer | implementation | lr | final val loss | val ppl | loss / AdamW | state bytes | state / AdamW | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        impl = IMPLEMENTATION.get(r["name"], f"slimtrain {r['name']}")
        if not r["available"]:
            lines.append(f"| {r['name']} | {impl} | - | not available | - | - | - | - | - |")
            continue
        tag = (" (best)" if r is best else " (grid)") if r["name"] == "adamw" and len(adamw) > 1 else ""
        lines.append(
            f"| {r['name']}{tag} | {impl} | {r['lr']:g} | {_loss_cell(r)} | {r['val_perplexity']:.3f} | "
            f"{r['final_val_loss'] / best['final_val_loss']:.3f} | {r['optimizer_state_bytes']:,} | "
            f"{r['optimizer_state_bytes'] / best['optimizer_state_bytes']:.3f} | {r['elapsed_s']:.0f} |"
        )
    lines += ["", f"![validation loss curves]({png})", "", f"{h}# Notes", "", *_notes(args, best), ""]
    path = os.path.join(args.out_dir, "convergence.md")
    existing = open(path).read() if os.path.exists(path) else ""
    with open(path, "w") as f:
        f.write(merge_sections(existing, args.section, "\n".join(lines)))
    curves = {}
    for r in rows:
        if r["available"] and (r["name"] != "adamw" or r is best):
            steps, losses = zip(*r["val_history"]) if r["val_history"] else ((), ())
            curves[f"{r['name']} (lr {r['lr']:g})"] = (list(steps), list(losses))
    metrics.plot_curves(curves, os.path.join(args.out_dir, png),
                         f"validation loss, {args.model} LLaMA on Shakespeare, {args.steps} steps")
    if not partial:
        print("\n".join(lines))


def _variant_text(args) -> str:
    """Sentences for the rows that are not a method at its defaults (empty for the default rows)."""
    names = {text.partition("@")[0] for text in args.optimizers}
    text = ""
    if any("@" in t for t in args.optimizers):
        text += " A row given as NAME@LR in --optimizers runs at that lr instead of its default (the lr column)."
    if names & {"frugal-block", "frugal-block8bit"}:
        text += (" `frugal-block` is FrugalAdamW(mode='block'): a quarter of the projected matrices (density 0.25) "
                 "get full AdamW for T steps and the rest signSGD, the window moving from the last matrix down "
                 "(block_order 'descending'), as the FRUGAL code's pre-training scripts run it.")
    if "spectral-sst" in names:
        text += (" `spectral-sst` is SST as its paper runs it: the attention and MLP layers replaced by their "
                 "singular factors (to_spectral, the rank above) and trained by SpectralSSTAdamW (lr 1e-3, T as "
                 "above); its state bytes are SpectralSSTAdamW.state_bytes(), the factors themselves are weights.")
    return text


_SECTION = re.compile(r"^<!-- section: (.+?) -->\n", re.M)


def merge_sections(existing: str, section: str | None, body: str) -> str:
    """``convergence.md`` with ``body`` as its main table (``section=None``) or as the section ``section``.

    Sections follow the main table, each opened by an HTML comment naming it, so a rerun of one table
    replaces that table alone and every table keeps the command that produced it.
    """
    parts = _SECTION.split(existing)
    main, sections = parts[0], dict(zip(parts[1::2], parts[2::2]))
    if section is None:
        main = body
    else:
        sections[section] = body
    text = main.rstrip("\n") + "\n"
    for title, part in sections.items():
        text += f"\n<!-- section: {title} -->\n{part.strip()}\n"
    return text


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


if __name__ == "__main__":
    main()
