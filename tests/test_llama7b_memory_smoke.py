"""benchmarks.llama7b_memory end to end at a tiny shape on whichever device is here: every configuration trains,
and the state slimtrain's optimizers hold is the state ``slimtrain memory`` predicts, to the byte."""

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("galore_torch")

from benchmarks import llama7b_memory  # noqa: E402
from tests._device import DEVICE  # noqa: E402


@pytest.fixture(scope="module")
def bench():
    return llama7b_memory


def test_tiny_run_writes_every_configuration(bench, tmp_path):
    out = tmp_path / "m.md"
    rows = bench.main(["--shape", "tiny", "--device", str(DEVICE), "--vocab", "512", "--seq-len", "32", "--steps", "2",
                       "--out", str(out)])
    assert [r["config"] for r in rows] == list(bench.CONFIGS)
    assert all("error" not in r for r in rows), rows
    for r in rows:
        if r["config"].startswith("slimtrain-"):
            assert r["state"] == r["predicted"]["state"], r
        else:  # the peers hold a little more: bitsandbytes' two 256-entry fp32 maps (2 KiB) per optimizer
            assert 0 <= r["state"] - r["predicted"]["state"] <= 2048 * r["n_optimizers"], r
    report = out.read_text()
    assert report.startswith("# LLaMA (tiny) training memory")
    assert "python -m benchmarks.llama7b_memory --shape tiny" in report
    assert all(f"| {c} |" in report for c in bench.CONFIGS)


def test_refuses_bad_arguments(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "adam"])
    assert "unknown --configs adam" in capsys.readouterr().err
    if DEVICE.type == "cpu":
        with pytest.raises(SystemExit):
            bench.parse_args(["--shape", "tiny", "--device", "cpu"])
        assert "--out is required off CUDA" in capsys.readouterr().err
