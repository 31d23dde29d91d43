"""benchmarks.kernel_speed runs end to end at its small size and says plainly what it did not run."""

import torch

from benchmarks import kernel_speed


def test_kernel_benchmark_quick(tmp_path):
    out = tmp_path / "kernels.md"
    kernel_speed.main(["--quick", "--repeats", "1", "--out", str(out)])
    report = out.read_text()
    assert f"`python -m benchmarks.kernel_speed --quick --repeats 1 --out {out}`" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 17  # eight ops, reference and Triton each, and the stored-basis matmul they replace
    if not torch.cuda.is_available():
        assert sum("not run: no GPU on this machine" in r for r in rows) == 8
    else:  # every Triton row timed, with its speedup over the reference
        triton_rows = [r for r in rows if "| Triton |" in r]
        assert len(triton_rows) == 8 and not any("not run" in r for r in triton_rows)
