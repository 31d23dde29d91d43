"""benchmarks.step_time's device, peer and kernel-backend options, at its --quick size on whichever
device is here: on CUDA it writes step_time_gpu.md with each step's transient memory."""

import pytest

from tests._device import DEVICE

from benchmarks import step_time


def test_peers_and_kernel_backends_each_get_a_row(tmp_path):
    pytest.importorskip("bitsandbytes")
    names = ["adamw", "adamw-fused", "bnb-adamw8bit", "galore"]
    rows = step_time.main(["--quick", "--device", str(DEVICE), "--optimizers", *names, "--kernel-backends", "auto", "torch",
                           "--out-dir", str(tmp_path)])
    assert [r["name"] for r in rows] == ["adamw", "adamw-fused", "bnb-adamw8bit", "galore", "galore [torch kernels]"]
    dense = [r for r in rows if r["name"] in ("adamw", "adamw-fused", "bnb-adamw8bit")]
    assert all(r["refresh"] is None for r in dense)  # peers without a subspace have no refresh step
    assert rows[3]["state"] == rows[4]["state"]  # the kernel backend changes how, not what, is kept
    cuda = DEVICE.type == "cuda"
    report = (tmp_path / ("step_time_gpu.md" if cuda else "step_time.md")).read_text()
    assert "| galore [torch kernels] | slimtrain galore [torch kernels] |" in report
    assert ("step transient MiB" in report) is cuda
    if cuda:
        assert all(r["transient"] is not None and r["transient"] >= 0 for r in rows)


def test_refuses_a_device_that_is_not_here():
    if DEVICE.type == "cuda":
        pytest.skip("CUDA is here")
    with pytest.raises(ValueError, match=r"Invalid --device: cuda \(CUDA is not available here\)"):
        step_time.parse_args(["--quick", "--device", "cuda"])
