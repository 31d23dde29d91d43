"""Do slimtrain's low-rank optimizers train LLaMA-60M as well as galore-torch and AdamW, on a GPU?

The setting: the GaLore paper's smallest shape (LLaMA-60M: hidden 512, intermediate 1376, 8 layers, 8 heads;
rank 128, update_proj_gap 200, scale 0.25) with a byte vocabulary, trained on a real corpus that no run
repeats: the Python sources of the packages installed beside slimtrain. Every optimizer sees the same
initial weights and the same batches in the same order. Runs:

- torch AdamW over a small lr grid (``--adamw-lrs``); the best final validation loss is the reference;
- galore-torch's ``GaLoreAdamW`` (the published implementation);
- slimtrain's GaLore, Fira, FRUGAL (``frugal``: subspace mode, slimtrain's default; ``frugal-block``: the
  paper's pre-training setting), DCT, SST in optimizer form, SST in the paper's form (``sst-spectral``:
  ``to_spectral`` + ``SpectralSSTAdamW``), and the 8-bit forms of the five.

    python -m benchmarks.convergence_gpu                  # on a GPU: writes benchmarks/results/convergence_gpu.md
    python -m benchmarks.convergence_gpu --quick --device cpu --out /tmp/c.md    # smoke run, seconds

It needs galore-torch (the reference) and bitsandbytes (the 8-bit forms' quantization maps) and refuses
to start without them. On a GPU machine without PyPI, put the wheels that ``scripts/fetch_gpu_wheels.sh``
fetches on ``PYTHONPATH`` first, as ``scripts/gpu_check.sh`` does:

    site=$(mktemp -d) && python -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl && \
        PYTHONPATH="$site:$PWD" python -m benchmarks.convergence_gpu

**Corpus.** The ``.py`` files of ``--corpus-packages`` (default: those of torch, transformers, triton,
jax, scipy, numpy, sympy that are installed; found with ``importlib.util.find_spec``, nothing imported),
sorted by path. A file goes to validation when a hash of its path relative to site-packages falls in the
lowest ``--val-percent`` (default 2%), so the split is by file and the same on every machine with the same
files. A file whose bytes equal those of an earlier one (vendored copies) is dropped, so no text is on
both sides. Training reads the training files in a seeded order and stops once it has the bytes it needs
(``steps x batch x seq_len``, refused with a clear error if the split is smaller); the stream is cut into
``batch`` equal lanes and row ``b`` of step ``t`` is bytes ``[t L, (t + 1) L]`` of lane ``b``, so no
input byte is seen twice in a run. Tokens are bytes (vocabulary 256); losses are nats per byte.

**Precision.** On CUDA ``--dtype bf16`` (default): bf16 weights, as galore-torch's ``torchrun_main.py``
runs the GaLore paper (see :mod:`slimtrain.recipes.runtime`); ``--dtype bf16-autocast`` for fp32 master
weights. On the CPU fp32.

**Runtime estimate (default 500 steps of 64 x 256 bytes, 16 runs).** The model has 25.6M parameters
(25.3M in the 56 projected matrices). Training FLOPs per token ~= 6 N + 12 L d T = 153M + 12.6M = 166M,
so a step of 16,384 tokens is 2.7 TFLOP and a run 1.36 PFLOP. At an assumed 100 TFLOP/s (10% of an
H100's dense bf16 peak: a 512-wide model in eager Hugging Face code is bound by its element-wise kernels
and launches, not its matmuls) that is ~14 s per run; adding ~10 s per run for optimizer steps (75
parameters stepped one by one), three projector refreshes and evaluation gives ~25 s per run and ~7 min
for all 16, within 12 minutes. This is an estimate, not a measurement: ``--time-budget``
(default 540 s, so the command fits a 10-minute device call) stops starting runs once the next one,
estimated at 1.25x the longest so far, would overrun it, and the results say which runs were skipped.
Runs go in order of what the targets need (galore-torch, GaLore, Fira, FRUGAL first), and the
table is rewritten after every run, so a stopped benchmark leaves what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import random
import time

import torch

from benchmarks._cli import command_line, invocation
from slimtrain.memory import llama_from_shape
from slimtrain.recipes import runtime
from slimtrain.recipes.data import VOCAB_SIZE
from slimtrain.recipes.models import build_model, model_config
from slimtrain.recipes.optim import DEFAULTS, TARGET_MODULES, build_optimizer, optimizer_state_bytes
from slimtrain.recipes.pretrain import evaluate, lr_factor, next_byte_loss

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "convergence_gpu.md")
MICRO = (64, 128, 2, 2)  # --quick's model: hidden, intermediate, heads, layers
DEFAULT_PACKAGES = ["torch", "transformers", "triton", "jax", "scipy", "numpy", "sympy"]
# Distribution names where they differ from the import name, for the versions in the header.
DISTRIBUTIONS = {"sklearn": "scikit-learn", "jaxlib": "jaxlib"}

# label -> (optimizer name in recipes.optim, extra constructor arguments, implementation shown in the table).
# The order is the run order: what the targets need first, so a time budget cuts the least needed runs.
RUNS: dict[str, tuple[str, dict, str]] = {
    "galore-torch": ("galore-torch", {}, "galore_torch.GaLoreAdamW"),
    "galore": ("galore", {}, "slimtrain GaLoreAdamW"),
    "fira": ("fira", {}, "slimtrain FiraAdamW"),
    "frugal-block": ("frugal", dict(mode="block"), "slimtrain FrugalAdamW(mode='block')"),
    "frugal": ("frugal", {}, "slimtrain FrugalAdamW (subspace)"),
    "dct": ("dct", {}, "slimtrain DCTAdamW"),
    "sst": ("sst", {}, "slimtrain SSTAdamW"),
    "sst-spectral": ("sst", {}, "slimtrain to_spectral + SpectralSSTAdamW"),
    **{f"{m}8bit": (f"{m}8bit", {}, f"slimtrain {cls}AdamW8bit")
       for m, cls in (("galore", "GaLore"), ("fira", "Fira"), ("frugal", "Frugal"), ("dct", "DCT"), ("sst", "SST"))},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=invocation(__file__), description=__doc__.split("\n")[0])
    p.add_argument("--model", default="60m", help="a shape of slimtrain.recipes.models (default: 60m; --quick: micro)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=128, help="GaLore paper's 60M rank (default 128)")
    p.add_argument("--update-proj-gap", type=int, default=200)
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--optimizers", nargs="+", default=list(RUNS), help=f"runs besides AdamW: {', '.join(RUNS)}")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="model init and training-file order")
    p.add_argument("--corpus-packages", nargs="+", default=None,
                   help=f"packages whose .py files make the corpus (default: those of {', '.join(DEFAULT_PACKAGES)} installed)")
    p.add_argument("--val-percent", type=float, default=2.0, help="share of files held out for validation")
    p.add_argument("--device", default="auto", help=runtime.DEVICES_HELP)
    p.add_argument("--dtype", default=None, choices=runtime.DTYPES, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds; no run starts that would end past it (default 540)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 4 steps of 2 x 32 bytes, one AdamW lr")
    p.add_argument("--out", default=None, help=f"results file (default on CUDA: {os.path.relpath(RESULTS)})")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.batch_size, args.seq_len, args.eval_batches = "micro", 4, 2, 32, 1
        args.rank, args.update_proj_gap, args.adamw_lrs = 16, 2, args.adamw_lrs[:1]
    for opt in ("steps", "batch_size", "seq_len", "eval_batches", "rank", "update_proj_gap"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} must be >= 1 (got {getattr(args, opt)})")
    unknown = [o for o in args.optimizers if o not in RUNS]
    if unknown:
        p.error(f"unknown --optimizers {', '.join(unknown)} (expected some of {', '.join(RUNS)})")
    args.device = runtime.resolve_device(args.device)
    on_cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    runtime.check_dtype(args.dtype, args.device)
    if args.out is None:
        if not on_cuda:
            p.error(f"a CPU run does not write {os.path.relpath(RESULTS)}: pass --out FILE")
        args.out = RESULTS
    return args


# ---------------------------------------------------------------- corpus


@dataclasses.dataclass
class Corpus:
    packages: list[dict]  # name, version, dir, files, bytes
    train_files: list[str]  # relative paths, in the order the stream reads them (only those read)
    val_files: list[str]
    train_split_files: int  # files on the training side of the split, read or not
    train_split_bytes: int
    duplicates: int  # files dropped because their bytes equal an earlier file's
    train: torch.Tensor  # uint8, what training reads
    val: torch.Tensor


def package_dirs(names: list[str] | None) -> list[tuple[str, str, str]]:
    """(name, package dir, site dir) for each package that is installed; explicit names must be."""
    found = []
    for name in names or DEFAULT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            if names is not None:
                raise ValueError(f"Invalid --corpus-packages: {name!r} is not an installed package")
            continue
        pkg = os.path.realpath(list(spec.submodule_search_locations)[0])
        found.append((name, pkg, os.path.dirname(pkg)))
    if not found:
        raise ValueError(f"No corpus: none of {', '.join(names or DEFAULT_PACKAGES)} is installed")
    return found


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return "?"


def is_val(relpath: str, val_percent: float) -> bool:
    """The split: a hash of the file's path below site-packages, so the same on every machine."""
    h = int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16)
    return h % 10_000 < val_percent * 100


def load_corpus(args) -> Corpus:
    packages, train_side, val_side = [], [], []
    for name, pkg, site in package_dirs(args.corpus_packages):
        n = size = 0
        for root, dirs, files in os.walk(pkg):
            dirs.sort()
            for f in sorted(files):
                path = os.path.join(root, f)
                if f.endswith(".py") and os.path.isfile(path) and os.path.getsize(path) > 0:
                    rel = os.path.relpath(path, site)
                    (val_side if is_val(rel, args.val_percent) else train_side).append((rel, path))
                    n, size = n + 1, size + os.path.getsize(path)
        packages.append(dict(name=name, version=_version(name), dir=pkg, files=n, bytes=size))
    train_side.sort()
    val_side.sort()
    seen: set[str] = set()
    duplicates = 0

    def read_new(path: str) -> bytes | None:
        nonlocal duplicates
        with open(path, "rb") as f:
            data = f.read()
        digest = hashlib.sha1(data).hexdigest()
        if digest in seen:
            duplicates += 1
            return None
        seen.add(digest)
        return data

    val_files, val_chunks = [], []
    for rel, path in val_side:  # all of validation first: a training file equal to one of them is dropped
        data = read_new(path)
        if data is not None:
            val_files.append(rel)
            val_chunks.append(data)
    # Each lane needs steps * seq_len input bytes and one more target byte.
    need = args.batch_size * (args.steps * args.seq_len + 1)
    order = list(range(len(train_side)))
    random.Random(args.seed).shuffle(order)  # seeded file order: the data order of --seed
    train_files, chunks, have = [], [], 0
    for i in order:
        if have >= need:
            break
        rel, path = train_side[i]
        data = read_new(path)
        if data is not None:
            train_files.append(rel)
            chunks.append(data)
            have += len(data)
    split_bytes = sum(os.path.getsize(p) for _, p in train_side)
    if have < need:
        raise ValueError(
            f"Corpus too small: {args.steps} steps x {args.batch_size} x {args.seq_len} bytes need {need:,} training "
            f"bytes, the training split of {', '.join(p['name'] for p in packages)} has {have:,} (after dropping "
            "duplicate files); add packages with --corpus-packages or lower --steps/--batch-size/--seq-len, "
            "since a run must not repeat its data"
        )
    val = b"".join(val_chunks)
    if len(val) < args.seq_len + 1:
        raise ValueError(f"Validation split too small: {len(val)} bytes (raise --val-percent)")
    return Corpus(packages, train_files, val_files, len(train_side), split_bytes, duplicates,
                  _as_uint8(b"".join(chunks)), _as_uint8(val))


def _as_uint8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class LaneBatches:
    """Batch ``t``: row ``b`` is bytes ``[t L, (t + 1) L]`` of lane ``b`` (the stream cut into ``batch``
    equal parts). Inputs never overlap, within a run or between rows; every run reads the same batches."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, steps: int):
        self.lane = len(tokens) // batch_size
        if self.lane < steps * seq_len + 1:
            raise ValueError(f"{len(tokens):,} bytes are too few for {steps} steps of {batch_size} x {seq_len}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len

    def starts(self, step: int) -> list[int]:
        return [b * self.lane + step * self.seq_len for b in range(self.batch_size)]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in self.starts(step)]).long()
        return rows[:, :-1], rows[:, 1:]


# ---------------------------------------------------------------- training


def config_for(args):
    """The model's ``LlamaConfig``: a recipe shape, or for ``--quick`` one smaller than ``tiny`` (seconds on a CPU)."""
    if args.model == "micro":
        return llama_from_shape(MICRO, VOCAB_SIZE, max_position_embeddings=args.seq_len,
                                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return model_config(args.model, VOCAB_SIZE, args.seq_len)


def build(args, label: str):
    """The seeded model on the device, and its optimizer."""
    model = build_model(config_for(args), args.seed).to(args.device)
    lr = None
    if label.startswith("adamw@"):
        name, extra, lr = "adamw", {}, float(label.split("@")[1])
    else:
        name, extra, _ = RUNS[label]
    if label == "sst-spectral":
        from slimtrain.optimizers import SpectralSSTAdamW, to_spectral

        to_spectral(model, TARGET_MODULES, args.rank, seed=args.seed)  # the SVD in fp32, then the cast
        model.to(dtype=runtime.weight_dtype(args.dtype))
        optimizer = SpectralSSTAdamW(model, lr=DEFAULTS["sst"]["lr"], update_proj_gap=args.update_proj_gap)
        return model, optimizer
    model.to(dtype=runtime.weight_dtype(args.dtype))
    optimizer = build_optimizer(name, model, lr=lr, rank=args.rank, update_proj_gap=args.update_proj_gap, **extra)
    return model, optimizer


def train_one(args, label: str, batches: LaneBatches, val: torch.Tensor) -> dict:
    device = args.device
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    runtime.reset_peak_memory(device)
    t0 = time.perf_counter()
    model, optimizer = build(args, label)
    lr = optimizer.param_groups[0]["lr"]
    warmup = args.steps // 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, args.steps))
    data_hash = hashlib.sha1()
    skip = min(10, args.steps // 5)  # steps before the throughput clock starts (allocator, cuBLAS warm-up)
    loss = float("nan")
    for step in range(args.steps):
        if step == skip:
            runtime.synchronize(device)
            t_clock = time.perf_counter()
        x, y = batches.batch(step)
        data_hash.update(x.numpy().tobytes())
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with runtime.autocast(device, args.dtype):
            loss = next_byte_loss(model, x, y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    runtime.synchronize(device)
    train_s = time.perf_counter() - t_clock
    final_train = loss.item()
    val_loss = evaluate(model, val, args.batch_size, args.seq_len, args.eval_batches, device, args.dtype)
    peak, source = runtime.peak_memory(device)
    row = dict(label=label, lr=lr, status="ok", final_train_loss=final_train, val_loss=val_loss,
               tokens_per_s=(args.steps - skip) * args.batch_size * args.seq_len / max(train_s, 1e-9),
               peak_memory_bytes=peak, peak_memory_source=source, state_bytes=optimizer_state_bytes(optimizer),
               wall_s=time.perf_counter() - t0, data_sha1=data_hash.hexdigest())
    del model, optimizer, scheduler
    return row


def run_labels(args) -> list[str]:
    grid = sorted(args.adamw_lrs)
    mid = grid[len(grid) // 2]
    adamw = [f"adamw@{lr:g}" for lr in [mid] + [lr for lr in grid if lr != mid]]
    fp32 = [o for o in args.optimizers if not o.endswith("8bit")]
    eight = [o for o in args.optimizers if o.endswith("8bit")]
    # The AdamW reference and the targets' runs first; the rest of the lr grid before the 8-bit forms.
    return adamw[:1] + fp32 + adamw[1:] + eight


def check_dependencies(labels: list[str]) -> None:
    """Fail in seconds, not after the first runs, when a package the runs need is missing."""
    needed = {"galore_torch": "galore-torch"} if "galore-torch" in labels else {}
    if any(label.endswith("8bit") for label in labels):
        needed["bitsandbytes"] = "bitsandbytes"
    missing = [dist for module, dist in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"convergence_gpu needs {', '.join(missing)}: pip install {' '.join(missing)} (or slimtrain[dev]; "
                          "without PyPI, the wheels of scripts/fetch_gpu_wheels.sh on PYTHONPATH), or leave those "
                          "runs out with --optimizers")


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_dependencies(run_labels(args))
    command = command_line(__file__, argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    corpus = load_corpus(args)
    batches = LaneBatches(corpus.train, args.batch_size, args.seq_len, args.steps)
    print(f"[convergence_gpu] corpus: {len(corpus.train):,} training bytes from {len(corpus.train_files)} files, "
          f"{len(corpus.val):,} validation bytes from {len(corpus.val_files)} files", flush=True)
    args.n_params = sum(p.numel() for p in build_model(config_for(args), 0).parameters())
    labels = run_labels(args)
    rows: list[dict] = []
    for label in labels:
        elapsed = time.perf_counter() - t_start
        # The next run is guessed at 1.25x the longest so far: runs differ (refreshes, 8-bit, spectral SST)
        # and the budget has to hold against a hard limit on the whole command.
        guess = 1.25 * max((r["wall_s"] for r in rows if "wall_s" in r), default=0.0)
        if elapsed + guess > args.time_budget:
            rows.append(dict(label=label, status=f"skipped: {elapsed:.0f} s used, next run ~{guess:.0f} s, "
                                                 f"budget {args.time_budget:g} s"))
            continue
        print(f"[convergence_gpu] {label} ...", flush=True)
        try:
            row = train_one(args, label, batches, corpus.val)
            print(f"[convergence_gpu]   val loss {row['val_loss']:.4f} nats/byte, {row['tokens_per_s']:,.0f} tokens/s, "
                  f"{row['wall_s']:.0f} s", flush=True)
        except Exception as e:  # one failing optimizer must not cost the others their rows
            row = dict(label=label, status=f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"[convergence_gpu]   {row['status']}", flush=True)
        rows.append(row)
        write_report(args, command, corpus, rows, time.perf_counter() - t_start, partial=True)
    write_report(args, command, corpus, rows, time.perf_counter() - t_start, partial=False)
    return dict(rows=rows, corpus=corpus, batches=batches, out=args.out)


# ---------------------------------------------------------------- report


def _ok(rows, label):
    return next((r for r in rows if r["label"] == label and r["status"] == "ok" and math.isfinite(r["val_loss"])), None)


def target_checks(args, rows: list[dict]) -> list[str]:
    """The targets, each a measured fact with PASS/FAIL (or NOT MEASURED)."""
    galore, ref, fira = _ok(rows, "galore"), _ok(rows, "galore-torch"), _ok(rows, "fira")
    block, subspace = _ok(rows, "frugal-block"), _ok(rows, "frugal")
    out = []
    if galore and ref:
        rel = galore["val_loss"] / ref["val_loss"] - 1
        out.append(f"- slimtrain GaLore within 1% of galore-torch (final validation loss, nats/byte): "
                   f"{galore['val_loss']:.4f} vs {ref['val_loss']:.4f}, {rel:+.2%}: **{'PASS' if abs(rel) <= 0.01 else 'FAIL'}**.")
    else:
        out.append("- slimtrain GaLore within 1% of galore-torch: **NOT MEASURED** (a run is missing).")
    if fira and galore:
        out.append(f"- Fira at or below GaLore (Fira paper, 60M C4: 31.06 vs 34.88 ppl): {fira['val_loss']:.4f} vs "
                   f"{galore['val_loss']:.4f}: **{'PASS' if fira['val_loss'] <= galore['val_loss'] else 'FAIL'}**.")
    else:
        out.append("- Fira at or below GaLore: **NOT MEASURED** (a run is missing).")
    if block and galore:
        below = block["val_loss"] < galore["val_loss"]
        out.append(f"- FRUGAL below GaLore, the order its paper reports at density 0.25 (pre-training FRUGAL is the "
                   f"block mode): {block['val_loss']:.4f} vs {galore['val_loss']:.4f}: **{'PASS' if below else 'FAIL'}**.")
        if subspace:
            out.append(f"  The subspace mode (slimtrain's default, not the paper's pre-training setting): "
                       f"{subspace['val_loss']:.4f} ({'below' if subspace['val_loss'] < galore['val_loss'] else 'not below'} GaLore).")
        if not below:
            out.append("  Not explained by this run. Differences from the paper's setting that could account for it: "
                       "a short budget (FRUGAL resets its moments every T steps and its signSGD part runs at "
                       f"lr 1e-3 against GaLore's 1e-2), batch {args.batch_size} x {args.seq_len} bytes instead of "
                       "512 x 256 tokens, bytes instead of a 32k vocabulary.")
    else:
        out.append("- FRUGAL vs GaLore order: **NOT MEASURED** (a run is missing).")
    return out


def _env(args) -> str:
    versions = [f"torch {torch.__version__}"]
    if torch.device(args.device).type == "cuda":
        where = f"{torch.cuda.get_device_name(args.device)} ({args.device})"
        versions.append(f"CUDA {torch.version.cuda}")
    else:
        where = f"the CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    for dist in ("triton", "galore-torch", "transformers", "bitsandbytes"):
        versions.append(f"{dist} {_version(dist)}")
    return f"{where}; Python {platform.python_version()}, {', '.join(versions)}"


def write_report(args, command: str, corpus: Corpus, rows: list[dict], total_s: float, partial: bool) -> None:
    config = config_for(args)
    n_params = args.n_params
    tokens = args.steps * args.batch_size * args.seq_len
    adamw = [r for r in rows if r["label"].startswith("adamw@") and _ok(rows, r["label"])]
    best = min(adamw, key=lambda r: r["val_loss"], default=None)
    precision = {"bf16": "bf16 weights and gradients (no autocast, as galore-torch's torchrun_main.py runs the "
                         "GaLore paper); slimtrain keeps optimizer state and update math in fp32, torch AdamW and "
                         "galore-torch keep bf16 state",
                 "bf16-autocast": "fp32 weights, forward under bf16 autocast",
                 "fp32": "fp32"}[args.dtype]
    pk = "\n".join(f"| {p['name']} | {p['version']} | {p['files']:,} | {p['bytes']:,} |" for p in corpus.packages)
    lines = [
        "# Convergence on a GPU: LLaMA-60M, low-rank optimizers vs AdamW and galore-torch",
        "",
        *(["**Partial: the benchmark is still running or was stopped; rows below are the runs finished so far.**", ""]
          if partial else []),
        "```",
        command,
        "```",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {_env(args)}. "
        f"Total {total_s / 60:.1f} min (time budget {args.time_budget:g} s).",
        "",
        f"Model `{args.model}` (hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads; {n_params / 1e6:.2f}M parameters "
        f"with the byte vocabulary), {precision}. {args.steps} steps of {args.batch_size} x {args.seq_len} bytes "
        f"({tokens / 1e6:.2f}M tokens), 10% warm-up then cosine to 10%, no weight decay, seed {args.seed}: the same "
        "initial weights and the same batches in the same order for every row (the data column's hash of all "
        f"inputs says so). Low-rank optimizers project the attention and MLP matrices (rank {args.rank}, "
        f"T = {args.update_proj_gap}, scale 0.25 for GaLore/Fira/DCT/galore-torch at lr 0.01; FRUGAL lr 1e-3 "
        "density 0.25; SST lr 1e-3); embeddings, norms and lm_head get AdamW inside the same optimizer.",
        "",
        "## Corpus",
        "",
        "`.py` files of these installed packages (sorted paths; files with the bytes of an earlier file dropped):",
        "",
        "| package | version | .py files | bytes |",
        "|---|---|---|---|",
        pk,
        "",
        f"Split by file (hash of the path below site-packages, {args.val_percent:g}% to validation): "
        f"validation {len(corpus.val_files):,} files, {len(corpus.val):,} bytes; training split "
        f"{corpus.train_split_files:,} files, {corpus.train_split_bytes:,} bytes, of which a run reads "
        f"{len(corpus.train_files):,} files ({len(corpus.train):,} bytes, in a seeded order) and uses "
        f"{tokens:,} input bytes, each once. {corpus.duplicates} duplicate files dropped. Validation: "
        f"{args.eval_batches} batches of {args.batch_size} x {args.seq_len} bytes spread over the validation files.",
        "",
        "## Results",
        "",
        "Loss is the mean next-byte cross-entropy in **nats per byte**; bits/byte = loss / ln 2; perplexity = "
        "exp(loss) is **per byte**, not comparable with the papers' per-token perplexities (32k-token vocabulary). "
        "Tokens/s counts training steps only (optimizer step included, evaluation excluded, the first "
        f"{min(10, args.steps // 5)} steps excluded). Peak memory: "
        + ("`torch.cuda.max_memory_allocated` during the run (tensors only)." if torch.device(args.device).type == "cuda"
           else "not measured on the CPU."),
        "",
        "| optimizer | implementation | lr | final val loss | bits/byte | val ppl (per byte) | loss / best AdamW | "
        "tokens/s | peak memory MiB | state bytes | wall s | data |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["label"]
        impl = "torch.optim.AdamW" if label.startswith("adamw@") else RUNS[label][2]
        tag = (" (best)" if r is best else " (grid)") if len(adamw) > 1 else ""
        name = "adamw" + tag if label.startswith("adamw@") else label
        if r["status"] != "ok":
            lines.append(f"| {name} | {impl} | - | {r['status']} | - | - | - | - | - | - | - | - |")
            continue
        ratio = f"{r['val_loss'] / best['val_loss']:.3f}" if best else "-"
        mem = f"{r['peak_memory_bytes'] / 2**20:,.0f}" if r["peak_memory_source"] == "cuda_max_memory_allocated" else "-"
        lines.append(
            f"| {name} | {impl} | {r['lr']:g} | {r['val_loss']:.4f} | {r['val_loss'] / math.log(2):.4f} | "
            f"{math.exp(min(r['val_loss'], 700)):.3f} | {ratio} | {r['tokens_per_s']:,.0f} | {mem} | "
            f"{r['state_bytes']:,} | {r['wall_s']:.0f} | `{r['data_sha1'][:10]}` |"
        )
    lines += ["", "## Targets", "", *target_checks(args, rows), ""]
    skipped = [r["label"] for r in rows if r["status"].startswith("skipped")]
    if skipped:
        lines += [f"Not run, for the time budget: {', '.join(skipped)}.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    if not partial:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
