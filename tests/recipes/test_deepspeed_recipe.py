"""The deepspeed recipe: refusals before any work, the launch command, and one real 2-rank run."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

import slimtrain
from slimtrain.cli import main as cli_main
from slimtrain.recipes import deepspeed as deepspeed_recipe
from slimtrain.recipes import deepspeed_options, metrics, pretrain

# The tiny model on 4 x 32-byte sequences: 2 per rank on 2 ranks.
TINY = ["--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]
# Where the ranks import slimtrain from: this checkout, whatever the installed copy is.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(slimtrain.__file__)))


def _config_file(tmp_path, config: dict | str) -> str:
    path = tmp_path / "ds.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


@pytest.mark.parametrize(
    "argv, config, world, message",
    [
        (["--optimizer", "adam"], None, 1, r"Invalid --optimizer: 'adam' \(expected one of adamw, galore"),
        (["--zero", "4"], None, 1, r"Invalid --zero: 4 \(expected 1, 2 or 3\)"),
        (["--zero", "0"], None, 1, r"Invalid --zero: 0 \(expected 1, 2 or 3\)"),
        (["--ds-config", "/nonexistent/ds.json"], None, 1, r"Invalid --ds-config: file not found: /nonexistent/ds.json"),
        (["--zero", "2", "--ds-config", "CONFIG"], {}, 1, r"Invalid --zero 2 with --ds-config: pick one"),
        (["--ds-config", "CONFIG"], "{not json", 1, r"Invalid --ds-config: .*ds.json is not JSON"),
        (["--ds-config", "CONFIG"], {"optimizer": {"type": "Adam"}}, 1,
         r"Invalid --ds-config: .*ds.json sets 'optimizer', which the recipe builds from --optimizer, --lr"),
        (["--ds-config", "CONFIG"], {"scheduler": {"type": "WarmupLR"}}, 1, r"sets 'scheduler', which the recipe builds"),
        (["--ds-config", "CONFIG"], {"zero_optimization": {"stage": 5}}, 1,
         r"Invalid --ds-config: zero_optimization.stage is 5 .*\(expected 0, 1, 2 or 3\)"),
        (["--ds-config", "CONFIG"], {"zero_optimization": {"stage": "two"}}, 1,
         r"Invalid --ds-config: zero_optimization.stage is 'two' .*\(expected 0, 1, 2 or 3\)"),
        (["--ds-config", "CONFIG"], {"zero_optimization": None}, 1,
         r"Invalid --ds-config: zero_optimization is None in .*ds.json \(expected an object"),
        (["--ds-config", "CONFIG", "--batch-size", "16"], {"train_micro_batch_size_per_gpu": 4}, 2,
         r"Invalid --ds-config: train_micro_batch_size_per_gpu is 4, but --batch-size 16 on 2 ranks needs 8"),
        (["--batch-size", "3"], None, 2,
         r"Invalid --batch-size: 3 \(expected a multiple of 2 ranks x 1 accumulation steps = 2\)"),
        (["--optimizer", "sst"], None, 1, r"Invalid --optimizer sst at ZeRO stage 2: SSTAdamW rewrites whole weights"),
        (["--optimizer", "frugal-block"], None, 1,
         r"Invalid --optimizer frugal-block at ZeRO stage 2: FrugalAdamW\(mode='block'\) chooses the active matrices"),
        (["--optimizer", "frugal-block8bit", "--zero", "1"], None, 1, r"Invalid --optimizer frugal-block8bit at ZeRO stage 1"),
        (["--optimizer", "spectral-sst"], None, 1,
         r"Invalid --optimizer spectral-sst with the deepspeed recipe: SpectralSSTAdamW steps the factors"),
        (["--optimizer", "spectral-sst", "--ds-config", "CONFIG"], {"zero_optimization": {"stage": 0}}, 1,
         r"Invalid --optimizer spectral-sst with the deepspeed recipe: .*run it with slimtrain pretrain"),
        (["--resume"], None, 1, r"Invalid --resume: no checkpoint at .*checkpoint/latest"),
        (["--steps", "0"], None, 1, r"Invalid --steps: 0"),
        (["--device", "cpu"], None, 1, r"Invalid --device: 'cpu' with the deepspeed recipe \(each rank runs on the accelerator"),
        (["--dtype", "fp16"], None, 1, r"Invalid --dtype: 'fp16' \(expected one of fp32, bf16, bf16-autocast\)"),
        (["--dtype", "bf16-autocast"], None, 1, r"Invalid --dtype: 'bf16-autocast' with the deepspeed recipe .*use --dtype bf16"),
        (["--ds-config", "CONFIG"], {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, 1,
         r"Invalid --dtype: 'fp32' with --ds-config .*ds.json enabling bf16: pass --dtype bf16"),
        (["--ds-config", "CONFIG", "--dtype", "bf16"], {"zero_optimization": {"stage": 0}}, 1,
         r"Invalid --dtype bf16 at ZeRO stage 0 with --optimizer galore: .*use --zero 1, 2 or 3, or --dtype fp32"),
        (["--ds-config", "CONFIG"], {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, 1,
         r"Invalid --ds-config: .*ds.json enables fp16, which the recipe has no mode for"),
        (["--ds-config", "CONFIG", "--optimizer", "adamw"], {"fp16": {"enabled": True}}, 1, r"enables fp16"),
        # What slimtrain.sharding.check_config refuses in the ranks is refused here too, before they start.
        (["--ds-config", "CONFIG"], {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, 1,
         r"Invalid --ds-config: .*ds.json: Unsupported zero_optimization.offload_optimizer.device: 'cpu'"),
        (["--ds-config", "CONFIG"], {"zero_optimization": {"stage": 1, "elastic_checkpoint": True}}, 1,
         r"Unsupported zero_optimization.elastic_checkpoint: true"),
    ],
)
def test_bad_arguments_fail_with_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, config, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    if config is not None:
        argv = [_config_file(tmp_path, config) if a == "CONFIG" else a for a in argv]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        deepspeed_recipe.main(["--no-progress", "--out", str(out), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists()


def test_non_empty_out_is_refused_without_resume(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("an earlier run")
    with pytest.raises(SystemExit):
        deepspeed_recipe.main(["--no-progress", "--out", str(tmp_path)])
    assert "is not empty (pass --resume to continue it or --overwrite to replace it)" in capsys.readouterr().err


def test_only_rank_0_reports_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        deepspeed_recipe.main(["--zero", "9", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err == ""


@pytest.mark.parametrize("stage", deepspeed_options.STAGES)
def test_shipped_configs_leave_batch_sizes_to_the_recipe(stage):
    config = deepspeed_options.shipped_config(stage)
    assert config["zero_optimization"]["stage"] == stage
    assert not {"optimizer", "scheduler"} & set(config)
    filled = deepspeed_options.with_batch_sizes(config, batch_size=16, world_size=2)
    assert [filled[k] for k in deepspeed_options.BATCH_KEYS] == [16, 8, 1]  # global batch, per rank, accumulation


def test_dtype_bf16_enables_the_configs_bf16_section(tmp_path):
    cfg = deepspeed_options.parse_args(["--zero", "2", "--dtype", "bf16", "--out", str(tmp_path / "run")])
    assert deepspeed_options.validate(cfg, world_size=2)["bf16"] == {"enabled": True}
    assert cfg.device == "auto"  # recorded as is: the ranks' device is DeepSpeed's choice
    fp32 = deepspeed_options.validate(deepspeed_options.parse_args(["--zero", "2", "--out", str(tmp_path / "run")]), world_size=2)
    assert fp32["bf16"] == {"enabled": False}  # the shipped config's


def test_batch_is_split_over_ranks_then_accumulation_steps():
    filled = deepspeed_options.with_batch_sizes({"gradient_accumulation_steps": 2, "train_batch_size": 16}, 16, world_size=2)
    assert [filled[k] for k in deepspeed_options.BATCH_KEYS] == [16, 4, 2]
    message = r"Invalid --batch-size: 12 \(expected a multiple of 2 ranks x 4 accumulation steps = 8\)"
    with pytest.raises(ValueError, match=message):
        deepspeed_options.with_batch_sizes({"gradient_accumulation_steps": 4}, batch_size=12, world_size=2)


def test_slimtrain_deepspeed_prints_the_launcher_command(tmp_path, capsys):
    out = tmp_path / "run"
    cli_main(["deepspeed", "--dry-run", "--ranks", "2", "--zero", "3", "--steps", "5", "--no-progress", "--out", str(out)])
    printed = shlex.split(capsys.readouterr().out.strip())
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29500",
                "--module", "slimtrain.recipes.deepspeed"]
    assert printed[: len(launcher)] == launcher
    cfg = deepspeed_options.parse_args(printed[len(launcher):])  # what each rank will parse
    assert (cfg.zero, cfg.steps, cfg.out, cfg.progress) == (3, 5, str(out), False)
    assert not out.exists()


def test_slimtrain_deepspeed_checks_arguments_before_launching(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["deepspeed", "--ranks", "2", "--batch-size", "5", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Invalid --batch-size: 5" in captured.err


def _no_launch(*args, **kwargs):
    pytest.fail(f"launched {args}")


def test_slimtrain_deepspeed_refuses_an_fp16_config_before_launching(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(subprocess, "call", _no_launch)
    config = _config_file(tmp_path, {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    with pytest.raises(SystemExit) as e:
        cli_main(["deepspeed", "--ds-config", config, "--no-progress", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == ""
    assert re.fullmatch(r"error: Invalid --ds-config: .*ds.json enables fp16.*\n", captured.err), captured.err


def test_slimtrain_deepspeed_launches_with_its_own_interpreter(tmp_path, capsys, monkeypatch):
    """The launcher is DeepSpeed's runner module in this Python: found whether or not the environment's bin/
    (where pip puts the `deepspeed` script) is on PATH, and never another environment's."""
    pytest.importorskip("deepspeed")
    launched = []
    monkeypatch.setenv("PATH", str(tmp_path))  # no `deepspeed` script on it
    monkeypatch.setattr(subprocess, "call", lambda command: launched.append(command) or 0)
    with pytest.raises(SystemExit) as e:
        cli_main(["deepspeed", "--ranks", "2", "--steps", "5", "--no-progress", "--out", str(tmp_path / "run")])
    assert e.value.code == 0
    assert launched[0][:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert shlex.split(capsys.readouterr().out.strip()) == launched[0]  # the command printed is the one run

    # An --out another run holds is refused before anything starts (rank 0 would be refused, later).
    fd = os.open(tmp_path / "run" / "slimtrain-run.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        monkeypatch.setattr(subprocess, "call", _no_launch)
        with pytest.raises(SystemExit) as e:
            cli_main(["deepspeed", "--ranks", "2", "--no-progress", "--out", str(tmp_path / "run")])
        assert e.value.code == 2 and "is in use by another slimtrain run" in capsys.readouterr().err
    finally:
        os.close(fd)


def test_running_the_file_as_a_script_says_how_to_launch():
    done = subprocess.run([sys.executable, deepspeed_recipe.__file__], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "run this recipe as a module: deepspeed --num_gpus N --module slimtrain.recipes.deepspeed" in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*argv: str) -> subprocess.CompletedProcess:
    """The recipe on 2 CPU ranks through DeepSpeed's own launcher (what the ``deepspeed`` command runs)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
               "--module", deepspeed_options.MODULE, *argv]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_two_ranks_match_one_process_across_a_resume(tmp_path, corpus, capsys):
    """GaLore at ZeRO-2 on 2 CPU ranks, stopped after 2 of 4 steps and resumed, against the pretrain
    recipe in one process with the same arguments.

    Data order is the same by construction: each rank takes its half of the batch the one process
    uses, and DeepSpeed averages the gradients. So the logged losses must match to fp32 rounding (the
    CSV keeps 6 decimals; measured: all equal but step 4's train loss, 1e-6 apart). A lost or wrongly restored optimizer state at the
    resume would move them by far more. The one projector refresh is at step 0: a later refresh of a
    rank-8 SVD of a 4-sequence gradient amplifies the rounding difference between one mean and a mean
    of two halves (measured 1e-3 after a refresh at step 2), which is the SVD's sensitivity, not the
    recipe's; the exactness of ``--resume`` itself across refreshes is checked bit for bit by
    ``tests/sharding/test_zero_checkpoint.py``.
    """
    pytest.importorskip("deepspeed")
    args = [*TINY, "--data", *corpus, "--optimizer", "galore", "--rank", "8", "--steps", "4", "--eval-every", "2"]
    single = pretrain.main([*args, "--out", str(tmp_path / "single")])

    out = tmp_path / "zero2"
    first = _launch(*args, "--zero", "2", "--out", str(out), "--stop-at", "2")
    assert first.stdout.count("stopped after 2 steps; continue with --resume") == 1  # rank 0 alone prints
    # `slimtrain deepspeed --resume` compares the run's arguments with the saved ones, not its own launcher options.
    capsys.readouterr()
    cli_main(["deepspeed", "--ranks", "2", *args, "--zero", "2", "--out", str(out), "--resume", "--dry-run"])
    assert "--resume" in shlex.split(capsys.readouterr().out)
    second = _launch(*args, "--zero", "2", "--out", str(out), "--resume")
    assert second.stdout.count("final val loss") == 1

    rows, ref = _rows(out), _rows(tmp_path / "single")
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]  # one writer: no duplicated rows
    assert [r["lr"] for r in rows] == [r["lr"] for r in ref]
    for key in ("train_loss", "val_loss"):
        ours = [float(r[key]) for r in rows if r[key]]
        theirs = [float(r[key]) for r in ref if r[key]]
        assert ours == pytest.approx(theirs, abs=2e-6), key  # 6-decimal CSV: at most one unit of rounding apart

    with open(out / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint" / "latest").read_text() == "step4"
    assert sorted(p.name for p in (out / "checkpoint").iterdir() if p.is_dir()) == ["step4"]  # older ones removed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["zero_stage"], summary["world_size"], summary["steps"]) == (2, 2, 4)
    assert summary["final_val_loss"] == pytest.approx(single["final_val_loss"], abs=2e-6)
    # The state is split: each rank holds about half of what the one process holds.
    assert max(summary["optimizer_state_bytes_per_rank"]) < 0.6 * single["optimizer_state_bytes"]


def test_a_damaged_deepspeed_checkpoint_is_refused_before_launch(tmp_path):
    where = tmp_path / "checkpoint"
    (where / "step2").mkdir(parents=True)
    (where / "latest").write_text("step2")
    with pytest.raises(ValueError, match=r"Invalid --resume: .*step2 holds no checkpoint files"):
        deepspeed_options.check_checkpoint(str(where))
    (where / "step2" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Invalid --resume: .*mp_rank_00_model_states.pt is not a readable checkpoint"):
        deepspeed_options.check_checkpoint(str(where))
    (where / "latest").write_text("../../elsewhere")
    with pytest.raises(ValueError, match=r"names '../../elsewhere', which is not a checkpoint directory"):
        deepspeed_options.check_checkpoint(str(where))


def test_two_ranks_bf16_with_activation_checkpointing(tmp_path, corpus):
    """--dtype bf16 (the config's bf16: bf16 weights, fp32 masters) with checkpointing at ZeRO-2 trains,
    and summary.json reports the dtype, tokens/s and rank 0's peak memory."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "bf16"
    _launch(*TINY, "--data", *corpus, "--optimizer", "galore", "--rank", "8", "--steps", "2", "--eval-every", "2",
            "--zero", "2", "--dtype", "bf16", "--activation-checkpointing", "--out", str(out))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["dtype"], summary["device"], summary["steps"]) == ("bf16", "cpu", 2)
    assert summary["tokens_per_s"] > 0 and summary["peak_memory_bytes"] > 0
    assert 0 < summary["final_val_loss"] < 5.6  # ln 256 = 5.55 at initialisation


def test_a_run_recorded_without_device_and_dtype_resumes(tmp_path):
    """A DeepSpeed run whose config.json lacks --device, --dtype and checkpointing resumes as device auto, fp32."""
    import torch

    out = tmp_path / "run"
    argv = ["--zero", "2", "--out", str(out)]
    fresh = deepspeed_options.parse_args(argv)
    deepspeed_options.validate(fresh, world_size=2)
    old = {k: v for k, v in pretrain.run_args(fresh).items() if k not in ("device", "dtype", "activation_checkpointing")}
    (out / "checkpoint" / "step2").mkdir(parents=True)
    (out / "checkpoint" / "latest").write_text("step2")
    torch.save({}, out / "checkpoint" / "step2" / "mp_rank_00_model_states.pt")
    (out / "config.json").write_text(json.dumps(old))
    (out / "metrics.csv").write_text(",".join(metrics.FIELDS) + "\n")
    deepspeed_options.validate(deepspeed_options.parse_args([*argv, "--resume"]), world_size=2)
    with pytest.raises(ValueError, match=r"--dtype 'bf16' \(was 'fp32'\)"):
        deepspeed_options.validate(deepspeed_options.parse_args([*argv, "--resume", "--dtype", "bf16"]), world_size=2)
