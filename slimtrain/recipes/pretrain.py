"""Pre-train a small LLaMA on Shakespeare (or your own text files) with any slimtrain optimizer.

    python -m slimtrain.recipes.pretrain --out runs/galore                  # GaLore, tiny model
    slimtrain pretrain --optimizer adamw --lr 3e-3 --out runs/adamw
    slimtrain pretrain --out runs/galore --resume                           # continue a stopped run
    slimtrain pretrain --model 1b --dtype bf16 --activation-checkpointing --rank 512 --out runs/1b   # a GPU

The default run (GaLore, rank 48, 1.9M-parameter LLaMA, 500 steps of 16 x 128 bytes, one thread) is
sized for two CPU cores. ``--out`` receives:

- ``config.json``: the resolved arguments (a resume must use the same ones) and ``data_sha256``, the
  SHA-256 of each data file as read;
- ``metrics.csv``: one row per step (train loss, lr, tokens, throughput), ``val_loss`` every
  ``--eval-every`` steps and at the last step (:mod:`slimtrain.recipes.metrics`);
- ``loss.png``: train and validation loss curves;
- ``checkpoint.pt``: model, optimizer, scheduler, RNG and step, written at every evaluation; it loads
  with ``torch.load(weights_only=True)``;
- ``summary.json``: final validation loss and perplexity, wall time, tokens/s (over the training steps,
  excluding validation), optimizer-state bytes, the device and dtype, and ``peak_memory_bytes`` with
  ``peak_memory_source``: ``cuda_max_memory_allocated`` on a GPU (tensors only, since this process
  started or resumed the run), ``cpu_peak_rss`` on the CPU (the whole process's peak resident set,
  Python and torch included: an upper bound, not comparable with the GPU number). The progress bar
  shows the same peak (``mem``) and the last step's tokens/s;
- ``slimtrain-run.json``, the marker naming these files, and ``slimtrain-run.lock``, which the run holds
  locked while it runs: a second run into the same ``--out`` is refused at once. ``--overwrite`` removes
  exactly the files a marker names and nothing else; a non-empty directory without one is never
  overwritten (remove its files yourself or pick a new ``--out``); ``--resume`` continues it.

Device and precision: ``--device`` is ``auto`` (``cuda`` when torch sees a GPU, else ``cpu``), ``cpu``,
``cuda`` or ``cuda:N``; one that is not there is refused. ``--dtype`` is ``fp32`` (default), ``bf16``
(bf16 weights and gradients, the optimizer's state and update math in fp32, rounded to nearest into the
weights: how galore-torch's ``torchrun_main.py`` runs the GaLore paper) or ``bf16-autocast`` (fp32 weights,
forward under bf16 autocast); :mod:`slimtrain.recipes.runtime` says what each costs.
``--activation-checkpointing`` recomputes each decoder layer's activations in the backward pass (the same
gradients, measured bit for bit on the CPU). ``--model 1b`` is the GaLore paper's LLaMA-1B shape (2048
hidden, 5461 intermediate, 24 layers, 32 heads) with the byte vocabulary.

Resume is exact: batches are a function of ``(seed, step)`` (see ``data.BlockBatches``), so a
stopped-and-resumed run ends with the same weights, bit for bit, as an uninterrupted one, in every
``--dtype`` and with checkpointing (tested on the CPU; on a GPU, only as far as its kernels are
deterministic: some, such as the embedding's backward, add in no fixed order). The resolved device, the
dtype and checkpointing are part of the recorded arguments: resuming with another dtype or another kind
of device (cpu vs cuda) is refused; another GPU index of the same kind is allowed. A run whose config
lacks them resumes as ``--device cpu --dtype fp32``. A data file whose contents changed since the run
started is refused, naming the file, unless ``--allow-data-change``; a run that recorded no fingerprint
resumes with a warning, and its fingerprint is recorded from then on.

This module is the driver: build, train (validating every ``--eval-every`` steps), write. The options and
their checks are :mod:`slimtrain.recipes.pretrain_options`; the text, :mod:`slimtrain.recipes.data`; the
files under ``--out``, :mod:`slimtrain.recipes.outputs` and :mod:`slimtrain.recipes.metrics`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Callable

import torch
from torch.nn import functional
from tqdm.auto import tqdm

from . import metrics, outputs, runtime
from .data import VOCAB_SIZE, BlockBatches, Splits, eval_batches, load_splits
from .models import build_model, model_config
from .optim import build_optimizer, optimizer_state_bytes, prepare_model
# The recipe's options and checks; `slimtrain pretrain` finds add_arguments and run_cli here.
from .pretrain_options import CHECKPOINT, add_arguments, own_out, parse_args, run_args, validate  # noqa: F401

# ----------------------------------------------------------------------------------------------
# Build: data, model, optimizer, schedule


def load_data(cfg: argparse.Namespace) -> tuple[Splits, BlockBatches]:
    """The train/validation split and the training batches; ``ValueError`` if the text is too short."""
    splits = load_splits(cfg.data)
    batches = BlockBatches(splits.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    next(eval_batches(splits.val, cfg.batch_size, cfg.seq_len, 1))  # raises if validation text is too short
    return splits, batches


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


def lr_factor(step: int, warmup: int, total: int, final: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to ``final`` at ``total`` (GaLore's C4 schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_schedule(cfg: argparse.Namespace) -> Callable[[int], float]:
    """The ``LambdaLR`` factor for ``cfg``: warm-up (``--warmup``, default a tenth of the steps), then cosine."""
    warmup = cfg.steps // 10 if cfg.warmup is None else cfg.warmup

    def schedule(step: int) -> float:
        return lr_factor(step, warmup, cfg.steps)

    return schedule


def next_byte_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per byte) of the model's next-byte predictions for inputs ``x``, from
    fp32 logits (a no-op in fp32; with bf16 weights the loss is not rounded to bf16)."""
    logits = model(input_ids=x, use_cache=False).logits
    return functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())


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
        # Through a temporary file and fsync: a run killed or out of disk mid-save keeps its previous checkpoint.
        outputs.write_atomic(os.path.join(out, CHECKPOINT), lambda f: torch.save(ckpt, f), sync=True)

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


# ----------------------------------------------------------------------------------------------
# Train, evaluate, write


def run(cfg: argparse.Namespace, data: tuple[Splits, BlockBatches] | None = None) -> dict:
    """Train as ``cfg`` says (already validated) and return the summary; with ``cfg.out``, own that
    directory for the run (:func:`own_out`) and write the outputs there."""
    torch.set_num_threads(cfg.threads)
    splits, batches = load_data(cfg) if data is None else data
    with own_out(cfg, CHECKPOINT, splits.sha256):
        steps = LocalSteps(cfg)  # build: the seeded model, its optimizer and schedule
        return train(cfg, splits, batches, steps)  # train, validate every --eval-every steps, write


def train(cfg: argparse.Namespace, splits: Splits, batches: BlockBatches, steps) -> dict:
    """The training loop, validation, progress bar, checkpoints and outputs, for one process or many.

    ``steps`` is a :class:`LocalSteps` or the DeepSpeed recipe's counterpart, with the same members
    (``model``, ``device``, ``dtype``, ``is_main``, ``recipe``, ``checkpoint``, ``lr()``, ``step(x, y)``,
    ``save``, ``load``, ``summary()``). Every process runs the same loop (under DeepSpeed, forward passes
    and checkpoints are collective); only ``steps.is_main`` writes files and shows progress, in an
    ``--out`` the caller owns. A file that cannot be written (a full disk) raises
    :class:`~slimtrain.recipes.outputs.WriteError` naming the last good checkpoint. Returns the summary.
    """
    start, elapsed, train_time = steps.load(cfg.out) if cfg.out is not None and cfg.resume else (0, 0.0, 0.0)
    writes = cfg.out is not None and steps.is_main
    saved_at = start if cfg.resume else None  # the step of the last good checkpoint
    try:
        rows = _open_outputs(cfg, start, steps.checkpoint, splits, steps.recipe) if writes else []
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
            bar.set_postfix(loss=f"{loss:.3f}", val=metrics.last_val(rows), tok_s=f"{tokens_per_step / dt:.0f}",
                            mem=f"{runtime.peak_memory(steps.device)[0] / 2**30:.2f}G")
            save = cfg.out is not None and (val_loss is not None or done == stop)
            if writes:
                metrics.append_metric(os.path.join(cfg.out, metrics.METRICS), row)
            if save:
                steps.save(cfg.out, done, time.perf_counter() - t_run, train_time)
                saved_at = done
            if writes and save:
                metrics.plot(rows, os.path.join(cfg.out, metrics.PLOT), f"{cfg.model} / {cfg.optimizer}")
        bar.close()

        peak, source = runtime.peak_memory(steps.device)
        backend = dict(device=str(steps.device), dtype=cfg.dtype, peak_memory_bytes=peak, peak_memory_source=source,
                       **steps.summary())
        summary = metrics.summary(cfg, rows, backend, time.perf_counter() - t_run, train_time)
        if writes:
            metrics.write_summary(cfg.out, summary)
    except OSError as e:
        if e.errno in outputs.OUT_OF_SPACE:
            raise outputs.write_error(e, saved_at) from e
        raise
    return summary


def _open_outputs(cfg: argparse.Namespace, start: int, checkpoint: str, splits: Splits, recipe: str) -> list[dict]:
    """Start or resume the run in ``--out`` (:func:`outputs.start_run`, :func:`outputs.resume_run`) and its
    log; returns the log's rows up to ``start``."""
    if cfg.resume:
        outputs.resume_run(cfg.out, cfg.data, splits.sha256, cfg.allow_data_change, start)
    else:
        names = [outputs.CONFIG, metrics.METRICS, metrics.PLOT, checkpoint, metrics.SUMMARY]
        outputs.start_run(cfg.out, recipe, names, {**run_args(cfg), outputs.FINGERPRINT: splits.sha256})
    return metrics.open_log(cfg.out, start if cfg.resume else None)


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
        total += functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


def main(argv: list[str] | None = None) -> dict:
    return run_cli(parse_args(argv))


def run_cli(cfg: argparse.Namespace) -> dict:
    """Check (a one-line error and exit status 2 on bad input or an ``--out`` in use), train, print the
    summary; a file the run cannot write is a one-line error and exit status 1."""
    try:
        validate(cfg)
        data = load_data(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        summary = run(cfg, data)
    except outputs.Refused as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except outputs.WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    metrics.print_summary(cfg, summary)
    return summary


if __name__ == "__main__":
    main()
