"""benchmarks/kernels.py runs end to end at its small size and says plainly what it did not run."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"


def test_kernel_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmarks_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "kernels.md"
    module.main(["--quick", "--repeats", "1", "--out", str(out)])
    report = out.read_text()
    assert "`python benchmarks/kernels.py --quick`" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 17  # eight ops, reference and Triton each, and the stored-basis matmul they replace
    if not torch.cuda.is_available():
        assert sum("not run: no GPU on this machine" in r for r in rows) == 8
    else:  # every Triton row timed, with its speedup over the reference
        triton_rows = [r for r in rows if "| Triton |" in r]
        assert len(triton_rows) == 8 and not any("not run" in r for r in triton_rows)
