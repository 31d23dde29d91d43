"""Pre-train a small LLaMA on Shakespeare (or your own text files) with any slimtrain optimizer.

    python -m slimtrain.recipes.pretrain --out runs/galore                  # GaLore, tiny model
    slimtrain pretrain --optimizer adamw --lr 3e-3 --out runs/adamw
    slimtrain pretrain --out runs/galore --resume                           # continue a stopped run
    slimtrain pretrain --model 1b --dtype bf16 --activation-checkpointing --rank 512 --out runs/1b   # a GPU

The default run (GaLore, rank 48, 1.9M-parameter LLaMA, 500 steps of 16 x 128 bytes, one thread) is
sized for two CPU cores. ``--out`` receives:

- ``config.json``: the resolved arguments (a resume must use the same ones);
- ``metrics.csv``: one row per step (train loss, lr, tokens, throughput), ``val_loss`` every
  ``--eval-every`` steps and at the last step;
- ``loss.png``: train and validation loss curves;
- ``checkpoint.pt``: model, optimizer, scheduler, RNG and step, written at every evaluation; it loads
  with ``torch.load(weights_only=True)``;
- ``summary.json``: final validation loss and perplexity, wall time, tokens/s (over the training steps,
  excluding validation), optimizer-state bytes, the device and dtype, and ``peak_memory_bytes`` with
  ``peak_memory_source``: ``cuda_max_memory_allocated`` on a GPU (tensors only, since this process
  started or resumed the run), ``cpu_peak_rss`` on the CPU (the whole process's peak resident set,
  Python and torch included: an upper bound, not comparable with the GPU number). The progress bar
  shows the same peak (``mem``) and the last step's tokens/s;
- ``slimtrain-run.json``: the marker naming these files. ``--overwrite`` removes exactly the files a
  marker names and nothing else; a non-empty directory without one is never overwritten. That includes
  a run directory written before runs had markers: ``--overwrite`` refuses it with a one-line error
  (remove its files yourself or pick a new ``--out``); ``--resume`` continues it as before.

``metrics.csv`` only grows by whole lines (one ``write`` each), and a resume rewrites it through a
temporary file; a torn or malformed line (a copy cut short, an old run killed mid-write) is dropped
with a warning when the log is read back.

Device and precision: ``--device`` is ``auto`` (``cuda`` when torch sees a GPU, else ``cpu``), ``cpu``,
``cuda`` or ``cuda:N``; one that is not there is refused. ``--dtype`` is ``fp32`` (default), ``bf16``
(bf16 weights and gradients, the optimizer's state and update math in fp32, rounded to nearest into the
weights: how galore-torch's ``torchrun_main.py`` runs the GaLore paper) or ``bf16-autocast`` (fp32 weights, forward under bf16
autocast); :mod:`slimtrain.recipes.runtime` says what each costs. ``--activation-checkpointing``
recomputes each decoder layer's activations in the backward pass (the same gradients, measured bit for
bit on the CPU). ``--model 1b`` is the GaLore paper's LLaMA-1B shape (2048 hidden, 5461 intermediate,
24 layers, 32 heads) with the byte vocabulary.

Resume is exact: batches are a function of ``(seed, step)`` (see ``data.BlockBatches``), so a
stopped-and-resumed run ends with the same weights, bit for bit, as an uninterrupted one, in every
``--dtype`` and with checkpointing (tested on the CPU; on a GPU, only as far as its kernels are
deterministic: some, such as the embedding's backward, add in no fixed order). The resolved device, the dtype and checkpointing
are part of the recorded arguments: resuming with another dtype or another kind of device (cpu vs cuda)
is refused; another GPU index of the same kind is allowed. A run recorded before these options existed
resumes as ``--device cpu --dtype fp32``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import outputs, runtime
from .data import VOCAB_SIZE, BlockBatches, Splits, check_files, eval_batches, load_splits, shakespeare_files
from .models import MODEL_SHAPES, build_model, model_config, smallest_matrix_dim
from .optim import build_optimizer, check_optimizer_name, default_rank, optimizer_state_bytes, prepare_model, recipe_names

CONFIG, METRICS, PLOT, CHECKPOINT, SUMMARY = "config.json", "metrics.csv", "loss.png", "checkpoint.pt", "summary.json"
CSV_FIELDS = ("step", "train_loss", "val_loss", "lr", "tokens", "elapsed_s", "tokens_per_s")
# Arguments that may differ between a run and its resumption without changing the result.
_RUN_CONTROL = ("resume", "overwrite", "stop_at", "out", "progress", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The recipe's options, on ``parser`` (shared by ``python -m`` and ``slimtrain pretrain``)."""
    a = parser.add_argument
    a("--model", default="tiny", help=f"model shape: {', '.join(MODEL_SHAPES)} (default: tiny, 1.9M parameters)")
    a("--optimizer", default="galore", help=f"{', '.join(recipe_names())} (default: galore)")
    a("--lr", type=float, default=None, help="peak learning rate (default: the method's, e.g. 0.01 GaLore, 1e-3 AdamW)")
    a("--rank", type=int, default=None, help="projection rank (default: a quarter of the smallest matrix dimension)")
    a("--update-proj-gap", type=int, default=None, help="steps between subspace refreshes (default: 200)")
    a("--scale", type=float, default=None, help="low-rank update scale alpha (default: 0.25 GaLore/Fira/DCT)")
    a("--density", type=float, default=None, help="FRUGAL's state-full fraction (default: 0.25)")
    a("--weight-decay", type=float, default=0.0, help="decoupled weight decay (default: 0)")
    a("--steps", type=int, default=500, help="optimizer steps (default: 500)")
    a("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    a("--seq-len", type=int, default=128, help="tokens (bytes) per sequence (default: 128)")
    a("--warmup", type=int, default=None, help="linear warm-up steps, then cosine to 10%% (default: steps/10)")
    a("--eval-every", type=int, default=100, help="steps between validation passes (default: 100)")
    a("--eval-batches", type=int, default=16, help="validation batches per pass (default: 16)")
    a("--seed", type=int, default=0, help="seed for weights and batch order (default: 0)")
    a("--device", default="auto", help=f"{runtime.DEVICES_HELP} (default: auto)")
    a("--dtype", default="fp32",
      help="fp32; bf16 (bf16 weights and gradients, the optimizer's state and math in fp32, as the GaLore "
           "paper's script casts the model); bf16-autocast (fp32 weights, bf16 autocast forward) (default: fp32)")
    a("--activation-checkpointing", action="store_true",
      help="recompute each transformer block's activations in the backward pass instead of keeping them")
    a("--data", nargs="+", default=None, metavar="FILE",
      help="text files, one document each, split into train/validation by file (default: Shakespeare)")
    a("--out", required=True, help="output directory (must be new or empty unless --resume/--overwrite)")
    a("--resume", action="store_true", help="continue from the checkpoint in OUT, with the same arguments")
    a("--overwrite", action="store_true",
      help="replace the outputs of an earlier slimtrain run in OUT (only the files its marker names)")
    a("--stop-at", type=int, default=None, metavar="STEP",
      help="stop after STEP steps (checkpointing there) without changing the schedule; continue with --resume")
    a("--threads", type=int, default=1,
      help="CPU threads (default: 1; on a shared 2-core machine 2 threads ran this model ~9x slower than 1)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slimtrain.recipes.pretrain", description=__doc__.split("\n")[0])
    return add_arguments(parser).parse_args(argv)


def validate(
    cfg: argparse.Namespace,
    allowed_optimizers: tuple[str, ...] | None = None,
    checkpoint: str = CHECKPOINT,
    resolve_device: bool = True,
) -> argparse.Namespace:
    """Check every argument before anything heavy; raise ``ValueError``/``FileNotFoundError`` naming it.

    Fills in ``cfg.rank``, ``cfg.data`` (the Shakespeare files by default) and ``cfg.device`` (``auto``
    resolved to ``cuda`` or ``cpu``). Cheap: builds a config, not a model, and reads no data.
    ``allowed_optimizers`` lets the benchmarks add the reference implementations, which the command line
    does not offer; ``checkpoint`` is the file under ``--out`` that ``--resume`` needs (the DeepSpeed
    recipe keeps a directory and its ``latest`` file instead, and places ranks itself:
    ``resolve_device=False``).
    """
    check_optimizer_name(cfg.optimizer, allowed_optimizers)
    if resolve_device:
        cfg.device = runtime.resolve_device(cfg.device)
        runtime.check_dtype(cfg.dtype, cfg.device)
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"Invalid --{name.replace('_', '-')}: {getattr(cfg, name)} (expected an integer >= 1)")
    config = model_config(cfg.model, VOCAB_SIZE, cfg.seq_len)
    for name in ("lr", "scale"):
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"Invalid --{name}: {value} (expected a number > 0)")
    if cfg.density is not None and not (cfg.optimizer.startswith("frugal") and 0.0 <= cfg.density <= 1.0):
        raise ValueError(f"Invalid --density: {cfg.density} (expected 0 <= density <= 1, with --optimizer frugal only)")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"Invalid --weight-decay: {cfg.weight_decay} (expected a number >= 0)")
    if cfg.optimizer == "adamw" and (cfg.rank, cfg.update_proj_gap, cfg.scale) != (None, None, None):
        raise ValueError("Invalid --rank/--update-proj-gap/--scale with --optimizer adamw (AdamW has no projection)")
    if cfg.optimizer == "spectral-sst" and cfg.scale is not None:
        raise ValueError(f"Invalid --scale: {cfg.scale} with --optimizer spectral-sst (SpectralSSTAdamW has no update scale)")
    if cfg.warmup is not None and not 0 <= cfg.warmup < cfg.steps:
        raise ValueError(f"Invalid --warmup: {cfg.warmup} (expected 0 <= warmup < steps = {cfg.steps})")
    if cfg.stop_at is not None and not 1 <= cfg.stop_at <= cfg.steps:
        raise ValueError(f"Invalid --stop-at: {cfg.stop_at} (expected 1 <= stop-at <= steps = {cfg.steps})")
    cfg.data = shakespeare_files() if cfg.data is None else check_files(cfg.data)
    if cfg.optimizer != "adamw":
        limit = smallest_matrix_dim(config)
        if cfg.rank is None:
            cfg.rank = default_rank(limit)
        if not 1 <= cfg.rank <= limit:
            raise ValueError(
                f"Invalid --rank: {cfg.rank} (expected 1 <= rank <= {limit}, the smallest dimension of "
                f"the {cfg.model} model's attention/MLP matrices)"
            )
    if cfg.update_proj_gap is not None and cfg.update_proj_gap < 1:
        raise ValueError(f"Invalid --update-proj-gap: {cfg.update_proj_gap} (expected an integer >= 1)")
    if cfg.out is not None:
        _check_out(cfg, checkpoint)
    return cfg


def _check_out(cfg: argparse.Namespace, checkpoint: str) -> None:
    if cfg.resume and cfg.overwrite:
        raise ValueError("Invalid --resume with --overwrite: pick one (continue the run in --out, or replace it)")
    outputs.check_out_writable(cfg.out)
    non_empty = os.path.isdir(cfg.out) and bool(os.listdir(cfg.out))
    if cfg.resume:
        ckpt = os.path.join(cfg.out, checkpoint)
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"Invalid --resume: no checkpoint at {ckpt}")
        if checkpoint == CHECKPOINT:  # the DeepSpeed recipe checks its checkpoint directory itself
            outputs.check_checkpoint_file(ckpt)
        # A run recorded before --device existed ran on the CPU, or (DeepSpeed, cfg.device "auto") where
        # DeepSpeed put it.
        legacy = {**runtime.LEGACY_DEFAULTS, "device": "auto" if cfg.device == "auto" else "cpu"}
        saved = {**legacy, **_read_config(os.path.join(cfg.out, CONFIG))}
        mismatched = {k: (saved.get(k), v) for k, v in _run_args(cfg).items() if saved.get(k) != v}
        if "device" in mismatched and runtime.same_device_kind(*map(str, mismatched["device"])):
            del mismatched["device"]  # another GPU of the machine: same kernels, same results
        if mismatched:
            diff = ", ".join(f"--{k.replace('_', '-')} {new!r} (was {old!r})" for k, (old, new) in mismatched.items())
            raise ValueError(f"Invalid --resume: arguments differ from the run in {cfg.out}: {diff}")
        metrics = os.path.join(cfg.out, METRICS)
        if not os.path.isfile(metrics):
            raise FileNotFoundError(
                f"Invalid --resume: no {METRICS} in {cfg.out} (the run's log): restore it, or put a file there "
                f"holding only the header line {','.join(CSV_FIELDS)} to continue without the earlier rows"
            )
        with open(metrics, newline="") as f:
            _check_header(metrics, [f.readline()])
    elif non_empty and not cfg.overwrite:
        raise ValueError(f"Invalid --out: {cfg.out!r} is not empty (pass --resume to continue it or --overwrite to replace it)")
    elif cfg.overwrite:
        outputs.check_overwritable(cfg.out)


def _read_config(path: str) -> dict:
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"Invalid --resume: no {CONFIG} at {path} (the arguments of the run to continue)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"Invalid --resume: {path} is not readable JSON ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"Invalid --resume: {path} holds a {type(saved).__name__} (expected the run's arguments)")
    return saved


def _run_args(cfg: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(cfg).items() if k not in _RUN_CONTROL}


def lr_factor(step: int, warmup: int, total: int, final: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to ``final`` at ``total`` (GaLore's C4 schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int,
             device: str | torch.device = "cpu", dtype: str = "fp32") -> float:
    """Mean next-byte cross-entropy (nats) on a fixed set of validation blocks, run on ``device`` as
    ``dtype`` says (:mod:`runtime`)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, batch_size, seq_len, max_batches):
        x, y = x.to(device), y.to(device)
        with runtime.autocast(str(device), dtype):
            logits = model(input_ids=x, use_cache=False).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def load_data(cfg: argparse.Namespace) -> tuple[Splits, BlockBatches]:
    """The train/validation split and the training batches; ``ValueError`` if the text is too short."""
    splits = load_splits(cfg.data)
    batches = BlockBatches(splits.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    next(eval_batches(splits.val, cfg.batch_size, cfg.seq_len, 1))  # raises if validation text is too short
    return splits, batches


def next_byte_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per byte) of the model's next-byte predictions for inputs ``x``, from
    fp32 logits (a no-op in fp32; with bf16 weights the loss is not rounded to bf16)."""
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def build_model_and_optimizer(
    cfg: argparse.Namespace, place: bool = True
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The seeded model and its optimizer, as ``cfg`` (already validated) says.

    The weights are initialised in fp32 on the CPU (the same ``--seed`` gives the same model on every
    device), then moved to ``cfg.device`` and, for ``--dtype bf16``, cast to bf16 before the optimizer
    is built, as galore-torch's ``torchrun_main.py`` does. ``place=False`` leaves them in fp32 on the CPU
    (DeepSpeed places and casts them itself). For ``spectral-sst`` the attention and MLP layers are
    replaced by their fp32 factors first (:func:`~slimtrain.recipes.optim.prepare_model`), before the
    optimizer is built and before :meth:`LocalSteps.load` restores a checkpoint into them.
    """
    model = build_model(model_config(cfg.model, VOCAB_SIZE, cfg.seq_len), cfg.seed)
    prepare_model(cfg.optimizer, model, rank=cfg.rank)
    if cfg.activation_checkpointing:
        runtime.enable_activation_checkpointing(model)  # each LlamaDecoderLayer
    if place:
        model.to(device=cfg.device, dtype=runtime.weight_dtype(cfg.dtype))
    optimizer = build_optimizer(
        cfg.optimizer, model, lr=cfg.lr, rank=cfg.rank, update_proj_gap=cfg.update_proj_gap,
        scale=cfg.scale, weight_decay=cfg.weight_decay, density=cfg.density,
    )
    return model, optimizer


def lr_schedule(cfg: argparse.Namespace) -> Callable[[int], float]:
    """The ``LambdaLR`` factor for ``cfg``: warm-up (``--warmup``, default a tenth of the steps), then cosine."""
    warmup = cfg.steps // 10 if cfg.warmup is None else cfg.warmup

    def schedule(step: int) -> float:
        return lr_factor(step, warmup, cfg.steps)

    return schedule


class LocalSteps:
    """Training in this process: ``loss.backward()``, ``optimizer.step()`` and one ``checkpoint.pt``.

    :func:`train` drives any object with this interface; ``recipes/deepspeed.py`` has the DeepSpeed
    one (``engine.backward``/``engine.step``, DeepSpeed checkpoints, rank 0 writing the files).
    """

    is_main = True  # this process writes the files and shows the progress bar
    recipe = "pretrain"  # named in the marker under --out
    checkpoint = CHECKPOINT  # the checkpoint's name under --out, one of the outputs the marker lists

    def __init__(self, cfg: argparse.Namespace):
        self.device, self.dtype = cfg.device, cfg.dtype
        self.model, self.optimizer = build_model_and_optimizer(cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(cfg))

    def lr(self) -> float:
        """The learning rate the next step uses."""
        return self.optimizer.param_groups[0]["lr"]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer step on the batch; returns its loss."""
        x, y = x.to(self.device), y.to(self.device)
        with runtime.autocast(self.device, self.dtype):
            loss = next_byte_loss(self.model, x, y)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def save(self, out: str, step: int, elapsed: float, train_time: float) -> None:
        ckpt = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), rng=torch.get_rng_state(), step=step,
                    elapsed_s=elapsed, train_s=train_time)
        if torch.device(self.device).type == "cuda":
            ckpt["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        path = os.path.join(out, CHECKPOINT)
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)  # a run killed mid-save keeps its previous checkpoint

    def load(self, out: str) -> tuple[int, float, float]:
        """Restore the checkpoint in ``out``; returns (step, elapsed seconds, training seconds) at the save."""
        # Onto the CPU first: load_state_dict moves each tensor to its parameter's device (which may be
        # another GPU index than at the save).
        ckpt = torch.load(os.path.join(out, CHECKPOINT), weights_only=True, map_location="cpu")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if "cuda_rng" in ckpt and torch.device(self.device).type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        return ckpt["step"], ckpt["elapsed_s"], ckpt["train_s"]

    def summary(self) -> dict:
        """Fields of ``summary.json`` that only the training backend knows."""
        return dict(optimizer_state_bytes=optimizer_state_bytes(self.optimizer))


def run(cfg: argparse.Namespace, data: tuple[Splits, BlockBatches] | None = None) -> dict:
    """Train as ``cfg`` says (already validated) and return the summary; writes files if ``cfg.out``."""
    torch.set_num_threads(cfg.threads)
    splits, batches = load_data(cfg) if data is None else data
    return train(cfg, splits, batches, LocalSteps(cfg))


def train(cfg: argparse.Namespace, splits: Splits, batches: BlockBatches, steps) -> dict:
    """The training loop, metrics, progress bar, checkpoints and outputs, for one process or many.

    ``steps`` is a :class:`LocalSteps` or the DeepSpeed recipe's counterpart, with the same members
    (``model``, ``device``, ``dtype``, ``is_main``, ``recipe``, ``checkpoint``, ``lr()``, ``step(x, y)``,
    ``save``, ``load``, ``summary()``).
    Every process runs the same loop (under DeepSpeed, forward passes and checkpoints are collective);
    only ``steps.is_main`` writes files and shows progress. Returns the summary.
    """
    start, elapsed, train_time = steps.load(cfg.out) if cfg.out is not None and cfg.resume else (0, 0.0, 0.0)
    writes = cfg.out is not None and steps.is_main
    rows = _open_outputs(cfg, start, steps.recipe, steps.checkpoint) if writes else []
    stop = cfg.steps if cfg.stop_at is None else cfg.stop_at
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_run = time.perf_counter() - elapsed
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.optimizer} {cfg.model}",
               disable=not (cfg.progress and steps.is_main), dynamic_ncols=True, leave=cfg.out is not None)
    steps.model.train()
    runtime.reset_peak_memory(steps.device)
    for step in range(start, stop):
        x, y = batches.batch(step)
        lr = steps.lr()
        t0 = time.perf_counter()
        loss = steps.step(x, y)
        runtime.synchronize(steps.device)  # the optimizer's kernels are queued after the loss is read
        dt = time.perf_counter() - t0
        train_time += dt
        done = step + 1
        val_loss = None
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val_loss = evaluate(steps.model, splits.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches,
                                steps.device, steps.dtype)
        row = dict(step=done, train_loss=f"{loss:.6f}", val_loss="" if val_loss is None else f"{val_loss:.6f}",
                   lr=f"{lr:.6g}", tokens=done * tokens_per_step, elapsed_s=f"{time.perf_counter() - t_run:.2f}",
                   tokens_per_s=f"{done * tokens_per_step / max(train_time, 1e-9):.0f}")
        rows.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", val=_last_val(rows), tok_s=f"{tokens_per_step / dt:.0f}",
                        mem=f"{runtime.peak_memory(steps.device)[0] / 2**30:.2f}G")
        save = cfg.out is not None and (val_loss is not None or done == stop)
        if writes:
            _append_metric(os.path.join(cfg.out, METRICS), row)
        if save:
            steps.save(cfg.out, done, time.perf_counter() - t_run, train_time)
        if writes and save:
            _plot(rows, os.path.join(cfg.out, PLOT), f"{cfg.model} / {cfg.optimizer}")
    bar.close()

    peak, source = runtime.peak_memory(steps.device)
    backend = dict(device=str(steps.device), dtype=cfg.dtype, peak_memory_bytes=peak, peak_memory_source=source,
                   **steps.summary())
    summary = _summary(cfg, rows, backend, time.perf_counter() - t_run, train_time)
    if writes:
        with open(os.path.join(cfg.out, SUMMARY), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _open_outputs(cfg: argparse.Namespace, start: int, recipe: str, checkpoint: str) -> list[dict]:
    """Create ``--out`` for a run starting at ``start``; returns the metric rows already there.

    A resumed run keeps the rows up to its checkpoint; a new one removes what the marker of an earlier
    run lists (``--overwrite``; nothing else), writes its own marker, and records its arguments.
    """
    if cfg.resume:
        rows = [r for r in read_metrics(os.path.join(cfg.out, METRICS)) if int(r["step"]) <= start]
    else:
        rows = []
        outputs.clear(cfg.out)
        outputs.claim(cfg.out, recipe, [CONFIG, METRICS, PLOT, checkpoint, SUMMARY])
        with open(os.path.join(cfg.out, CONFIG), "w") as f:
            json.dump(_run_args(cfg), f, indent=2)
    _write_metrics(os.path.join(cfg.out, METRICS), rows)
    return rows


def _last_val(rows: list[dict]) -> str:
    return next((r["val_loss"][:5] for r in reversed(rows) if r["val_loss"]), "-")


def _summary(cfg, rows, backend: dict, elapsed: float, train_time: float) -> dict:
    vals = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    final_val = vals[-1][1] if vals else None
    return dict(
        optimizer=cfg.optimizer,
        model=cfg.model,
        steps=int(rows[-1]["step"]) if rows else 0,
        final_train_loss=float(rows[-1]["train_loss"]) if rows else None,
        final_val_loss=final_val,
        val_perplexity=math.exp(final_val) if final_val is not None else None,
        val_history=vals,
        elapsed_s=elapsed,
        train_s=train_time,
        tokens_per_s=float(rows[-1]["tokens_per_s"]) if rows else None,
        **backend,
    )


def read_metrics(path: str) -> list[dict]:
    """The rows of a ``metrics.csv``, without the lines a crash or a cut copy left malformed.

    A malformed line (a torn last line, fields missing or not numbers) is dropped, with one warning on
    stderr naming the file and the lines: the run goes on from its checkpoint, those steps stay unlogged.
    """
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    _check_header(path, lines[:1])
    rows, dropped = [], []
    for number, line in enumerate(lines[1:], start=2):
        row = _parse_metric(line)
        if row is None:
            dropped.append(f"{number}: {line.rstrip()[:40]!r}")
        else:
            rows.append(row)
    if dropped:
        print(f"warning: {path}: dropped {len(dropped)} malformed line(s), torn by a crash or a cut copy "
              f"(line {'; line '.join(dropped)})", file=sys.stderr)
    return rows


def _check_header(path: str, first: list[str]) -> None:
    if next(csv.reader(first), None) != list(CSV_FIELDS):
        raise ValueError(f"Invalid --resume: {path} does not start with the header line {','.join(CSV_FIELDS)}")


def _parse_metric(line: str) -> dict | None:
    """One ``metrics.csv`` line as a row, or None if it is not a whole, well-formed one."""
    if not line.endswith("\n"):
        return None  # torn: every line is written whole, newline last
    fields = next(csv.reader([line]), [])
    if len(fields) != len(CSV_FIELDS):
        return None
    row = dict(zip(CSV_FIELDS, fields))
    try:
        int(row["step"]), int(row["tokens"])
        for key in ("train_loss", "lr", "elapsed_s", "tokens_per_s"):
            float(row[key])
        if row["val_loss"]:
            float(row["val_loss"])
    except ValueError:
        return None
    return row


def _write_metrics(path: str, rows: list[dict]) -> None:
    """Replace the log with ``rows``, through a temporary file: a crash leaves the old log or the new one."""
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def _append_metric(path: str, row: dict) -> None:
    """Append one row as one ``write`` of the whole line (never a partial line, short of a full disk)."""
    line = io.StringIO()
    csv.DictWriter(line, CSV_FIELDS).writerow(row)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = line.getvalue().encode()
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path} (disk full?)")
    finally:
        os.close(fd)


def _plot(rows: list[dict], path: str, title: str) -> None:
    plot_curves({"train": ([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows]),
                 "validation": ([int(r["step"]) for r in rows if r["val_loss"]],
                                [float(r["val_loss"]) for r in rows if r["val_loss"]])},
                path, title)


def plot_curves(curves: dict[str, tuple[list, list]], path: str, title: str) -> None:
    """Loss curves to a PNG; a curve named ``train`` (or ending in ``(train)``) is drawn thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (steps, losses) in curves.items():
        thin = label == "train" or label.endswith("(train)")
        ax.plot(steps, losses, label=label, lw=0.8 if thin else 1.8, alpha=0.6 if thin else 1.0,
                marker=None if thin else "o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    return run_cli(parse_args(argv))


def run_cli(cfg: argparse.Namespace) -> dict:
    """Validate (one-line error and exit status 2 on bad input), train, print the summary."""
    try:
        validate(cfg)
        data = load_data(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = run(cfg, data)
    print_summary(cfg, summary)
    return summary


_PEAK_WORDS = {"cuda_max_memory_allocated": "CUDA tensors", "cpu_peak_rss": "process RSS"}


def print_summary(cfg: argparse.Namespace, summary: dict) -> None:
    """The run's one-line result: final validation loss, or where a stopped run stands."""
    if summary["steps"] == cfg.steps:
        print(f"final val loss {summary['final_val_loss']:.4f} (perplexity {summary['val_perplexity']:.2f}) "
              f"after {summary['steps']} steps, {summary['elapsed_s']:.0f} s, {summary['tokens_per_s']:.0f} tokens/s; "
              f"optimizer state {summary['optimizer_state_bytes'] / 2**20:.2f} MiB; peak memory "
              f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB ({_PEAK_WORDS[summary['peak_memory_source']]}); "
              f"outputs in {cfg.out}")
    else:
        print(f"stopped after {summary['steps']} steps; continue with --resume (outputs in {cfg.out})")


if __name__ == "__main__":
    main()
