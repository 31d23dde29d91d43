"""benchmarks.adapters' layer-stack harness (the GPU speed test) at a small size on whichever device is
here: every method builds, trains forward and backward, and gets a row."""

import argparse

import pytest

from tests._device import DEVICE

pytest.importorskip("peft")

from benchmarks import adapters as bench  # noqa: E402


def test_harness_times_every_method(tmp_path):
    args = argparse.Namespace(device=str(DEVICE), dim=64, layers=4, tokens=32, rounds=1)
    table, medians = bench.harness(args)
    assert set(medians) == set(bench.harness_methods(4)), table  # none failed to build
    assert all(m > 0 for m in medians.values())
    assert "| PEFT LoRA r16 | " in table and "| 1.00 |" in table
    out = tmp_path / "a.md"
    bench.main(["--harness", "--device", str(DEVICE), "--dim", "64", "--tokens", "32", "--rounds", "1", "--out", str(out)])
    assert out.read_text().startswith("# Adapters on a layer stack")
