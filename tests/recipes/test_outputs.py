"""What a recipe may do to --out: a lock makes a run its only writer, a marker claims the directory,
--overwrite removes only what it lists, --resume checks the data's fingerprint, a torn metrics log is read
back without its bad lines, a full disk and bad paths are one-line errors."""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from slimtrain.recipes import metrics, outputs, pretrain

TINY = ["--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress",
        "--optimizer", "adamw"]


def _run(out, corpus, *extra):
    return pretrain.main([*TINY, "--data", *corpus, "--out", str(out), *extra])


def _rows(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _fails(capsys, argv_or_call, message):
    with pytest.raises(SystemExit) as e:
        argv_or_call()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    return err


# ----------------------------------------------------------------------------------------------
# The marker


def test_overwrite_clears_only_what_the_marker_lists(tmp_path):
    out = tmp_path / "run"
    outputs.claim(str(out), "deepspeed", ["config.json", "checkpoint"])
    (out / "config.json").write_text("{}")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "latest").write_text("step4")
    (out / "notes.txt").write_text("mine")
    (out / "loss.png").write_text("mine too: not in this run's marker")
    outputs.check_overwritable(str(out))
    outputs.clear(str(out))
    assert sorted(os.listdir(out)) == ["loss.png", "notes.txt"]


def test_a_marker_never_reaches_outside_its_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (tmp_path / "precious").mkdir()
    (out / outputs.MARKER).write_text(json.dumps({"recipe": "pretrain", "outputs": ["../precious", "/", "a/b"]}))
    outputs.clear(str(out))
    assert (tmp_path / "precious").is_dir() and os.listdir(out) == []


def test_a_directory_without_a_marker_is_not_overwritable(tmp_path):
    outputs.check_overwritable(str(tmp_path / "new"))  # absent or empty: nothing to lose
    outputs.check_overwritable(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # e.g. a model directory
    with pytest.raises(ValueError, match=r"Invalid --overwrite: .* has no slimtrain-run.json"):
        outputs.check_overwritable(str(tmp_path))


def test_pretrain_overwrite_keeps_files_it_did_not_write(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    _run(out, corpus, "--steps", "2", "--eval-every", "2")
    assert json.loads((out / outputs.MARKER).read_text())["recipe"] == "pretrain"
    (out / "notes.txt").write_text("mine")
    _run(out, corpus, "--steps", "3", "--eval-every", "3", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"
    assert [int(r["step"]) for r in _rows(out)] == [1, 2, 3]

    # A directory no slimtrain run claimed (here: its marker removed) is left as it is.
    os.remove(out / outputs.MARKER)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    _fails(capsys, lambda: _run(out, corpus, "--steps", "2", "--overwrite"),
           r"^error: Invalid --overwrite: .*run' has no slimtrain-run.json.*pick a new --out$")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_deepspeed_overwrite_does_not_remove_a_checkpoint_dir_it_did_not_write(tmp_path, capsys, monkeypatch):
    from slimtrain.recipes import deepspeed as deepspeed_recipe

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "weights.bin").write_text("someone's")
    _fails(capsys, lambda: deepspeed_recipe.main(["--no-progress", "--overwrite", "--out", str(tmp_path)]),
           r"Invalid --overwrite: .* has no slimtrain-run.json")
    assert (tmp_path / "checkpoint" / "weights.bin").exists()


# ----------------------------------------------------------------------------------------------
# metrics.csv


def _metrics(path, *lines):
    path.write_text(",".join(metrics.FIELDS) + "\r\n" + "".join(lines), newline="")


def test_torn_and_malformed_lines_are_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.csv"
    good = "1,5.5,,0.001,64,0.10,640\r\n"
    _metrics(path, good, "2,5.4,4.9,0.001,128,0.20,640\r\n", "3,5.3,,0.0", )
    rows = metrics.read_metrics(str(path))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert re.search(r"dropped 1 malformed line\(s\).*line 4: '3,5.3,,0.0'", capsys.readouterr().err)
    # A log a torn line was once appended to and then continued: the bad row in the middle, whole rows after it.
    _metrics(path, good, "2,5.4\r\n", "3,5.3,,0.001,192,0.30,640\r\n", "x,5.2,,0.001,256,0.4,640\r\n")
    assert [r["step"] for r in metrics.read_metrics(str(path))] == ["1", "3"]
    assert "dropped 2 malformed line(s)" in capsys.readouterr().err


def test_resume_after_a_torn_metrics_line(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ("--steps", "12", "--eval-every", "10")
    _run(out, corpus, *args, "--stop-at", "10")
    with open(out / "metrics.csv", "a", newline="") as f:
        # Killed while logging step 12, after its last checkpoint (step 10): the row of step 11 is whole,
        # step 12's is cut inside its step number, which then reads as step 1 (<= 10: kept before).
        f.write(_rows(out)[-1]["step"].replace("10", "11") + ",4.9,,0.001,704,1.0,640\r\n1")
    _run(out, corpus, *args, "--resume")
    assert "dropped 1 malformed line(s)" in capsys.readouterr().err
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == list(range(1, 13)) and all(r["tokens_per_s"] for r in rows)
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


def test_metric_lines_are_appended_whole(tmp_path):
    path = tmp_path / "metrics.csv"
    metrics.write_metrics(str(path), [])
    row = dict(step=1, train_loss="5.5", val_loss="", lr="0.001", tokens=64, elapsed_s="0.1", tokens_per_s="640")
    metrics.append_metric(str(path), row)
    assert path.read_bytes().endswith(b"\n") and not (tmp_path / "metrics.csv.tmp").exists()
    assert metrics.read_metrics(str(path))[0]["step"] == "1"


# ----------------------------------------------------------------------------------------------
# One-line errors for bad paths


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _fails(capsys, lambda: pretrain.main(["--no-progress", "--out", str(tmp_path / "file" / "run")]),
           r"^error: Invalid --out: .*file/run' is under .*file', which is not a directory")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_out_in_an_unwritable_directory_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    _fails(capsys, lambda: pretrain.main(["--no-progress", "--out", str(locked / "run")]),
           r"Invalid --out: .*locked/run' would be created in .*locked', which is not writable")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_checkpoint_on_resume_is_one_line(tmp_path, corpus, capsys, damage):
    out = tmp_path / "run"
    args = ("--steps", "4", "--eval-every", "2")
    _run(out, corpus, *args, "--stop-at", "2")
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(b"" if damage == "empty" else ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    _fails(capsys, lambda: _run(out, corpus, *args, "--resume"),
           r"^error: Invalid --resume: .*checkpoint.pt is not a readable checkpoint")


def test_missing_metrics_on_resume_is_one_line(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ("--steps", "4", "--eval-every", "2")
    _run(out, corpus, *args, "--stop-at", "2")
    os.remove(out / "metrics.csv")
    _fails(capsys, lambda: _run(out, corpus, *args, "--resume"), r"^error: Invalid --resume: no metrics.csv in ")
    (out / "metrics.csv").write_text(",".join(metrics.FIELDS) + "\n")  # what the message offers
    _run(out, corpus, *args, "--resume")
    assert [int(r["step"]) for r in _rows(out)] == [3, 4]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4


# ----------------------------------------------------------------------------------------------
# A run owns its --out: an exclusive lock, held for the run's life


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCK, FINGERPRINT = "slimtrain-run.lock", "data_sha256"  # documented names: the lock file, config.json's key


@contextlib.contextmanager
def _locked_elsewhere(out, owner=b"4242 otherhost\n"):
    """Hold the lock a run takes on ``out``, as another process would: flock treats each open() as its own
    owner, so this process's recipe calls are refused just as a second process would be."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, owner)
    try:
        yield
    finally:
        os.close(fd)


def test_a_locked_out_is_refused_before_anything_is_written(tmp_path, corpus, capsys, monkeypatch):
    out = tmp_path / "run"
    with _locked_elsewhere(out):
        _fails(capsys, lambda: _run(out, corpus, "--steps", "2"),
               r"^error: Invalid --out: '.*run' is in use by another slimtrain run \(pid 4242 on otherhost\)")
        assert os.listdir(out) == [LOCK]  # nothing of the refused run's
        # Rank 0 of the DeepSpeed recipe takes the same lock before the ranks start their process group.
        from slimtrain.recipes import deepspeed as deepspeed_recipe

        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setattr(deepspeed_recipe, "init_distributed", lambda: pytest.fail("started despite the lock"))
        _fails(capsys, lambda: deepspeed_recipe.main([*TINY, "--data", *corpus, "--out", str(out)]),
               r"is in use by another slimtrain run \(pid 4242")
    # Released (as the OS releases it when its owner exits, however it exits): the lock file left behind
    # does not make the directory "not empty".
    _run(out, corpus, "--steps", "2", "--eval-every", "2")
    assert [int(r["step"]) for r in _rows(out)] == [1, 2]
    assert (out / LOCK).read_text().split()[0] == str(os.getpid())  # the last owner


def test_two_runs_started_together_into_one_out(tmp_path, corpus):
    """Two real processes into the same new --out at once: one trains, the other is refused with one
    line, and the directory holds one run's files only (its seed in config.json, its rows, once each)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))}
    argv = [sys.executable, "-m", "slimtrain.recipes.pretrain", *TINY, "--data", *corpus, "--steps", "3",
            "--eval-every", "3", "--out", str(out)]
    procs = [subprocess.Popen([*argv, "--seed", str(seed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for seed in (1, 2)]
    done = [(*p.communicate(timeout=300), p.returncode) for p in procs]
    assert sorted(code for _, _, code in done) == [0, 2], done
    winner = next(i for i, (_, _, code) in enumerate(done) if code == 0)
    won_out, (lost_out, lost_err, _) = done[winner][0], done[1 - winner]
    assert "outputs in" in won_out and "outputs in" not in lost_out
    assert len(lost_err.strip().splitlines()) == 1
    assert re.search(r"^error: Invalid --out: .* (is in use by another slimtrain run \(pid \d+ on .+\)|is not empty)",
                     lost_err.strip()), lost_err
    assert json.loads((out / "config.json").read_text())["seed"] == winner + 1
    assert [int(r["step"]) for r in _rows(out)] == [1, 2, 3]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


# ----------------------------------------------------------------------------------------------
# --resume checks the data's fingerprint


def _own_corpus(tmp_path, corpus):
    """A copy of the corpus the test may edit."""
    copies = []
    for path in corpus:
        copy = tmp_path / "data" / os.path.basename(path)
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(open(path, "rb").read())
        copies.append(str(copy))
    return copies


def test_resume_refuses_changed_data_unless_allowed(tmp_path, corpus, capsys):
    data, out = _own_corpus(tmp_path, corpus), tmp_path / "run"
    args = ("--steps", "4", "--eval-every", "2")
    _run(out, data, *args, "--stop-at", "2")
    recorded = json.loads((out / "config.json").read_text())[FINGERPRINT]
    assert recorded == {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in data}
    with open(data[1], "a") as f:
        f.write("An added line.\n")
    err = _fails(capsys, lambda: _run(out, data, *args, "--resume"),
                 rf"^error: Invalid --resume: {re.escape(data[1])} changed since the run started \(SHA-256 "
                 rf"{recorded[data[1]][:12]}\.\.\. then, [0-9a-f]{{12}}\.\.\. now\).*--allow-data-change")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2  # nothing resumed
    _fails(capsys, lambda: _run(tmp_path / "new", data, *args, "--allow-data-change"),
           r"Invalid --allow-data-change without --resume")

    assert _run(out, data, *args, "--resume", "--allow-data-change")["steps"] == 4
    assert re.search(r"warning: continuing on changed data \(--allow-data-change\): .*" + re.escape(data[1]),
                     capsys.readouterr().err), err
    config = json.loads((out / "config.json").read_text())
    assert config[FINGERPRINT][data[1]] == hashlib.sha256(open(data[1], "rb").read()).hexdigest()
    assert config["data_sha256_from_step"] == 2


def test_a_run_without_a_fingerprint_resumes_with_a_warning_and_records_one(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ("--steps", "4", "--eval-every", "2")
    _run(out, corpus, *args, "--stop-at", "2")
    config = json.loads((out / "config.json").read_text())
    del config[FINGERPRINT]
    (out / "config.json").write_text(json.dumps(config))
    assert _run(out, corpus, *args, "--resume")["steps"] == 4
    assert "records no data fingerprint" in capsys.readouterr().err
    assert set(json.loads((out / "config.json").read_text())[FINGERPRINT]) == set(corpus)


# ----------------------------------------------------------------------------------------------
# A full disk


@contextlib.contextmanager
def _small_disk(where, size: str):
    """A tmpfs of ``size`` mounted at ``where``; skips the test where this process may not mount one."""
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    try:
        yield lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _full_disk_save(obj, f):
    """What torch.save (2.13) does on a full disk, measured on a 20 MiB tmpfs: its file object's write raises
    OSError(ENOSPC), and its zip writer, closing, raises a RuntimeError in the middle of handling it."""
    f.write(b"part of a checkpoint")
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7510592 vs 7510488") from None


@pytest.mark.parametrize("disk", ["tmpfs", "fake"])
def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temporary_file(tmp_path, corpus, capsys,
                                                                                   monkeypatch, disk):
    """The second checkpoint does not fit: on a real 32 MiB tmpfs (AdamW's 23 MB checkpoint and its 23 MB
    temporary file), or, where no tmpfs can be mounted, through torch.save failing as it does on one."""
    args = ("--steps", "4", "--eval-every", "2")
    with contextlib.ExitStack() as stack:
        if disk == "tmpfs":
            grow = stack.enter_context(_small_disk(tmp_path / "disk", "32m"))
            out = tmp_path / "disk" / "run"
            run = lambda *extra: _run(out, corpus, *args, *extra)  # noqa: E731
        else:
            out = tmp_path / "run"
            _run(out, corpus, *args, "--stop-at", "2")
            save = torch.save
            monkeypatch.setattr(torch, "save", _full_disk_save)
            grow = lambda size: monkeypatch.setattr(torch, "save", save)  # noqa: E731
            run = lambda *extra: _run(out, corpus, *args, "--resume", *extra)  # noqa: E731
        with pytest.raises(SystemExit) as e:
            run()
        assert e.value.code == 1
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(r"error: no space left on device writing .*run/checkpoint\.pt; the last good checkpoint "
                            r"is step 2: free space, then continue with --resume", err), err
        assert not os.path.lexists(out / "checkpoint.pt.tmp")  # the space it took is free again
        assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
        grow("128m")
        assert _run(out, corpus, *args, "--resume")["steps"] == 4  # and the message's advice works


def test_write_atomic_removes_its_temporary_file_on_enospc(tmp_path):
    def write(f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        outputs.write_atomic(str(tmp_path / "checkpoint.pt"), write)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "checkpoint.pt")
    assert os.listdir(tmp_path) == []
    assert str(outputs.write_error(e.value, None)).endswith("no checkpoint was written: free space, then start the "
                                                            "run again with --overwrite")


def test_write_atomic_does_not_write_through_a_link(tmp_path):
    (tmp_path / "elsewhere.txt").write_text("not the run's")
    os.symlink(tmp_path / "elsewhere.txt", tmp_path / "summary.json.tmp")
    with pytest.raises(OSError):
        outputs.write_json(str(tmp_path / "summary.json"), {"steps": 4})
    assert (tmp_path / "elsewhere.txt").read_text() == "not the run's" and not (tmp_path / "summary.json").exists()
