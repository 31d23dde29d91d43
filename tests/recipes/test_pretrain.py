import csv
import json
import os
import re

import pytest
import torch

from slimtrain.cli import main as cli_main
from slimtrain.recipes import pretrain

# A few steps of the tiny model on 2 x 32-byte sequences of a small corpus (conftest.py): about a second per run.
TINY = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]


def _run(out, corpus, *extra):
    return pretrain.main([*TINY, "--data", *corpus, "--out", str(out), *extra])


def _rows(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_cli_tiny_run_writes_csv_png_checkpoint(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    cli_main(["pretrain", *TINY, "--data", *corpus, "--optimizer", "galore", "--rank", "8",
              "--steps", "4", "--eval-every", "2", "--out", str(out)])
    assert "final val loss" in capsys.readouterr().out
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True]
    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and set(ckpt) >= {"model", "optimizer", "scheduler", "rng"}
    assert json.loads((out / "config.json").read_text())["rank"] == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["optimizer_state_bytes"] > 0


def _available_low_rank():
    from slimtrain.optimizers import OPTIMIZERS

    return [n for n in ("galore", "fira", "frugal", "dct", "sst") if n in OPTIMIZERS]


@pytest.mark.parametrize("optimizer", ["adamw", *_available_low_rank()])
def test_resume_is_bit_exact(tmp_path, corpus, optimizer):
    # update-proj-gap 2 puts subspace refreshes (and FRUGAL's resets) on both sides of the stop.
    args = ["--optimizer", optimizer, "--steps", "6", "--eval-every", "2"]
    if optimizer != "adamw":
        args += ["--rank", "8", "--update-proj-gap", "2"]
    _run(tmp_path / "straight", corpus, *args)
    _run(tmp_path / "stopped", corpus, *args, "--stop-at", "3")
    assert int(_rows(tmp_path / "stopped")[-1]["step"]) == 3
    _run(tmp_path / "stopped", corpus, *args, "--resume")

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    keys = ("step", "train_loss", "val_loss", "lr")
    assert [[r[k] for k in keys] for r in _rows(tmp_path / "straight")] == [
        [r[k] for k in keys] for r in _rows(tmp_path / "stopped")
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optimizer", "adam"], r"Invalid --optimizer: 'adam' \(expected one of adamw, galore, .*fira.*frugal.*dct.*sst"),
        (["--rank", "500"], r"Invalid --rank: 500 \(expected 1 <= rank <= 192"),
        (["--rank", "0"], r"Invalid --rank: 0"),
        (["--model", "7b"], r"Invalid --model: '7b' \(expected one of tiny, small, 60m"),
        (["--data", "/nonexistent/play.txt"], r"Invalid --data: file\(s\) not found: /nonexistent/play.txt"),
        (["--steps", "0"], r"Invalid --steps: 0"),
        (["--steps", "5", "--stop-at", "6"], r"Invalid --stop-at: 6"),
        (["--lr", "-1"], r"Invalid --lr: -1.0"),
        (["--resume"], r"Invalid --resume: no checkpoint"),
        (["--optimizer", "galore", "--density", "0.5"], r"Invalid --density: 0.5 \(.*with --optimizer frugal only\)"),
        (["--optimizer", "adamw", "--rank", "8"], r"Invalid --rank/--update-proj-gap/--scale with --optimizer adamw"),
        (["--resume", "--overwrite"], r"Invalid --resume with --overwrite"),
    ],
)
def test_bad_arguments_fail_with_one_line_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--no-progress", "--out", str(out), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_out_is_not_overwritten_silently(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    _run(out, corpus, "--optimizer", "adamw", "--steps", "2", "--eval-every", "2")
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(SystemExit):
        _run(out, corpus, "--optimizer", "adamw", "--steps", "3", "--eval-every", "3")
    assert "is not empty (pass --resume to continue it or --overwrite to replace it)" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    _run(out, corpus, "--optimizer", "adamw", "--steps", "3", "--eval-every", "3", "--overwrite")
    assert [int(r["step"]) for r in _rows(out)] == [1, 2, 3]


def test_resume_with_different_arguments_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    _run(out, corpus, "--optimizer", "adamw", "--steps", "4", "--eval-every", "2", "--stop-at", "2")
    with pytest.raises(SystemExit):
        _run(out, corpus, "--optimizer", "adamw", "--steps", "4", "--eval-every", "2", "--lr", "0.1", "--resume")
    assert "Invalid --resume: arguments differ from the run" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    factors = [pretrain.lr_factor(s, warmup=10, total=100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert pretrain.lr_factor(100, warmup=10, total=100) == pytest.approx(0.1)
