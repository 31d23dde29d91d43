"""The fsdp recipe: refusals before any work, the launch command, and a real 2-rank run stopped and resumed."""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys

import pytest

import slimtrain
from slimtrain.cli import main as cli_main
from slimtrain.recipes import fsdp as R
from slimtrain.recipes import pretrain

pytest.importorskip("torch.distributed.fsdp")

# The tiny model on 4 x 32-byte sequences: 2 per rank on 2 ranks.
TINY = ["--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(slimtrain.__file__)))


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--optimizer", "adam"], 1, r"Invalid --optimizer: 'adam' \(expected one of adamw, galore"),
        (["--optimizer", "spectral-sst"], 1, r"Invalid --optimizer spectral-sst with the fsdp recipe: .*slimtrain pretrain"),
        (["--optimizer", "frugal-block8bit"], 1, r"Invalid --optimizer frugal-block8bit with the fsdp recipe: .*could not "
                                                 r"be resumed; use --optimizer frugal"),
        (["--device", "cuda:1"], 1, r"Invalid --device: 'cuda:1' with the fsdp recipe \(expected one of auto, cpu, cuda"),
        (["--dtype", "bf16-autocast"], 1, r"Invalid --dtype: 'bf16-autocast' with the fsdp recipe .*use --dtype bf16"),
        (["--batch-size", "3"], 2, r"Invalid --batch-size: 3 \(expected a multiple of the 2 ranks\)"),
        (["--resume"], 1, r"Invalid --resume: no checkpoint at .*checkpoint/latest"),
        (["--steps", "0"], 1, r"Invalid --steps: 0"),
    ],
)
def test_bad_arguments_fail_with_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        R.main(["--no-progress", "--out", str(out), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_placement_is_a_choice(capsys):
    with pytest.raises(SystemExit):
        R.parse_args(["--placement", "columns", "--out", "x"])
    assert "invalid choice: 'columns' (choose from 'low-rank', 'rows')" in capsys.readouterr().err


def test_slimtrain_fsdp_prints_the_torchrun_command(tmp_path, capsys):
    out = tmp_path / "run"
    cli_main(["fsdp", "--dry-run", "--ranks", "3", "--steps", "5", "--batch-size", "6", "--placement", "rows", "--no-progress", "--out", str(out)])
    printed = shlex.split(capsys.readouterr().out.strip())
    start = printed.index("--standalone")
    assert printed[start:start + 5] == ["--standalone", "--nproc_per_node", "3", "-m", R.MODULE]
    cfg = R.parse_args(printed[start + 5:])  # what each rank will parse
    assert (cfg.steps, cfg.batch_size, cfg.placement, cfg.out, cfg.progress) == (5, 6, "rows", str(out), False)
    assert not out.exists()


def test_slimtrain_fsdp_checks_arguments_before_launching(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fsdp", "--ranks", "2", "--batch-size", "5", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Invalid --batch-size: 5" in captured.err


def _slimtrain_fsdp(*argv: str) -> subprocess.CompletedProcess:
    """``slimtrain fsdp --ranks 2 ...`` as a user runs it: it prints the torchrun command and runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "slimtrain.cli", "fsdp", "--ranks", "2", *argv]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, _failure(done)
    return done


def _failure(done: subprocess.CompletedProcess) -> str:
    """What a failed launch printed: the end of its output, a rank's first traceback and torchrun's summary."""
    err, first = done.stderr, done.stderr.find("Traceback")
    return done.stdout[-2000:] + (err[first:first + 4000] + "\n...\n" if first >= 0 else "") + err[-2000:]


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("optimizer", ["galore"])
def test_two_ranks_match_one_process_across_a_resume(tmp_path, corpus, optimizer):
    """2 CPU ranks, stopped after 2 of 4 steps and resumed from the DCP checkpoint, against the pretrain recipe in
    one process with the same arguments: each rank takes its half of the batch and FSDP2 averages the gradients,
    so the losses match to fp32 rounding (the CSV keeps 6 decimals); a wrongly restored weight or optimizer state
    would move steps 3 and 4 far more. Rank 8, as tests/recipes/test_deepspeed_recipe.py: the SVD at the first
    step turns its basis with the last bits of a 4-sequence gradient when singular values lie close, which at the
    tiny model's default rank 48 moves the second step's loss by 2e-5 (the SVD's sensitivity, not the sharding's:
    tests/sharding/test_fsdp.py holds every method to 1e-5 in weights). The exactness of ``--resume`` itself is
    checked bit for bit there too (a sharded DCP checkpoint resumed on the same ranks)."""
    args = [*TINY, "--data", *corpus, "--optimizer", optimizer, "--rank", "8", "--steps", "4", "--eval-every", "2"]
    pretrain.main([*args, "--out", str(tmp_path / "single")])
    out = tmp_path / "fsdp"
    first = _slimtrain_fsdp(*args, "--out", str(out), "--stop-at", "2")
    assert first.stdout.count("stopped after 2 steps; continue with --resume") == 1  # rank 0 alone prints
    second = _slimtrain_fsdp(*args, "--out", str(out), "--resume")
    assert second.stdout.count("final val loss") == 1
    rows, ref = _rows(out), _rows(tmp_path / "single")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref]
    for key in ("train_loss", "val_loss"):
        for r, s in zip(rows, ref):
            if s[key]:
                assert float(r[key]) == pytest.approx(float(s[key]), abs=2e-6), (key, r["step"])
    assert sorted(os.listdir(out / "checkpoint")) == ["latest", "step4"]  # the newest only
