"""``scripts/trajectories.py``, the bit-for-bit guard of optimizer refactors: a record compares equal to
itself, and a record that differs in one bit is reported and fails (run in this process: the script's own
import of slimtrain is the slow part of a subprocess)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "trajectories.py"


def test_record_then_compare(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("trajectories", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path, only = str(tmp_path / "record.pt"), ["--only", "fira8bit", "zero-frugal"]
    assert script.main(["record", path, *only]) == 0
    assert script.main(["compare", path, *only]) == 0
    assert "2 of 2 configurations bit-identical" in capsys.readouterr().out
    record = torch.load(path, weights_only=True)
    record["fira8bit"][7]["weights"][0].view(torch.int32)[0, 0] ^= 1  # one bit of one weight after step 8
    torch.save(record, path)
    assert script.main(["compare", path, *only]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS fira8bit" in out and "fira8bit[7]/weights[0]: differs" in out and "same    zero-frugal" in out
