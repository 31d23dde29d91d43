"""Every kernel compiles to PTX and cubin for sm_80 (A100) and sm_90 (H100) in every dtype variant,
on this GPU-less machine: the check that covers what the interpreter cannot run (bf16 arithmetic,
lowering, tl.dot layouts). See _aot_compile.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("_aot_compile.py")
    out = subprocess.run([sys.executable, str(script), "80", "90"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip() == "compiled 34", out.stdout
