"""Backend choice: automatic by device, forceable, visible, and loud when a forced choice cannot work."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from slimtrain import kernels
from slimtrain.kernels import _dispatch, adam

from .._device import DEVICE


def _step(n: int = 7, device=DEVICE) -> torch.Tensor:
    t = lambda fill: torch.full((n,), fill, device=device)  # noqa: E731
    return adam.adam_direction_(t(1.0), t(0.0), t(0.0), 0.9, 0.999, 1e-8)


def test_cpu_tensors_run_the_torch_reference_by_default():
    assert kernels.get_backend() == "auto"
    _step(device="cpu")
    assert kernels.backends_used()[("adam_direction", "cpu")] == "torch"


def test_forcing_a_backend_is_scoped_and_recorded(caplog):
    with caplog.at_level(logging.INFO, logger="slimtrain.kernels"):
        with kernels.use_backend("triton"):
            assert kernels.get_backend() == "triton"
            forced = _step()
        assert kernels.get_backend() == "auto"
        with kernels.use_backend("torch"):
            reference = _step()
    assert torch.equal(forced, reference)  # g = 1 from zero moments: exact in both
    lines = [r.getMessage() for r in caplog.records]
    on = f"adam_direction on {DEVICE.type} runs the"
    assert any(f"{on} triton implementation" in line for line in lines), lines
    assert any(f"{on} torch implementation" in line for line in lines), lines


def test_set_backend_is_process_wide():
    try:
        kernels.set_backend("torch")
        assert kernels.get_backend() == "torch"
        with kernels.use_backend("triton"):  # a block still overrides it
            assert kernels.get_backend() == "triton"
    finally:
        kernels.set_backend("auto")


@pytest.mark.parametrize("bad", ["cuda", "Triton", ""])
def test_unknown_backend_names_the_value(bad):
    with pytest.raises(ValueError, match=rf"Invalid backend: {bad!r} \(expected one of 'auto', 'torch', 'triton'\)"):
        kernels.set_backend(bad)
    with pytest.raises(ValueError, match="Invalid backend"):
        with kernels.use_backend(bad):
            pass


def test_forced_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1"):
        _step(device="cpu")


def test_environment_variable_chooses_and_is_checked():
    code = "import slimtrain.kernels as k; print(k.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={"SLIMTRAIN_KERNELS": "torch", "PATH": ""},
                         capture_output=True, text=True)
    assert out.stdout.strip() == "torch", out.stderr
    bad = subprocess.run([sys.executable, "-c", code], env={"SLIMTRAIN_KERNELS": "fast", "PATH": ""},
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert "Invalid SLIMTRAIN_KERNELS environment variable: 'fast'" in bad.stderr


def test_auto_picks_triton_only_for_cuda(monkeypatch):
    monkeypatch.setattr(_dispatch._triton, "available", lambda: True)
    assert _dispatch.choose("probe", torch.device("cuda")) == "triton"
    assert _dispatch.choose("probe", torch.device("cpu")) == "torch"
    monkeypatch.setattr(_dispatch._triton, "available", lambda: False)
    assert _dispatch.choose("probe", torch.device("cuda")) == "torch"
