#!/usr/bin/env bash
# The GPU benchmarks, gpu_check.sh's sibling. Each part runs one benchmark module (python -m benchmarks.NAME, from
# the repository root) and writes a results file naming the GPU and the versions, under benchmarks/results/:
#   step       step_time_gpu.md       optimizer step time and transient memory, 4 layers of the LLaMA-1B shape,
#                                     fp32 master weights, rank 512, beside torch AdamW (fused) and galore-torch,
#                                     bitsandbytes AdamW8bit; slimtrain on Triton and on its torch kernels (step_time)
#   adapters   adapters_gpu.md        4 x Linear(4096, 4096), bf16, 4096 tokens, forward + backward (adapters)
#   memory7b   llama7b_memory_gpu.md  peak memory of layer-wise LLaMA-7B steps vs slimtrain memory (llama7b_memory)
#   convergence convergence_gpu.md    LLaMA-60M on Python sources, every optimizer (convergence_gpu; ~7 min alone)
#
#   bash scripts/gpu_bench.sh step adapters               # the parts named, in that order
#   SLIMTRAIN_WHEELS=.whl bash scripts/gpu_bench.sh step   # first install those wheels into a side directory
#
# Budget per part, on one H100/H200 (each is cut by `timeout` at its limit and leaves what it measured):
# step 300 s (it writes its table at the end: a cut run leaves none), adapters 120 s, memory7b 420 s, convergence 580 s. A device session of 15 minutes fits
# gpu_check.sh plus one or two short parts; plan the long ones for sessions of their own.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
[ "$#" -ge 1 ] || { echo "usage: gpu_bench.sh PART... (step, adapters, memory7b, convergence)" >&2; exit 2; }
for part in "$@"; do
    case "$part" in step|adapters|memory7b|convergence) ;; *) echo "gpu_bench.sh: unknown part '$part'" >&2; exit 2;; esac
done
NAME=gpu_bench.sh . "$root/scripts/_gpu_env.sh"

status=0
for part in "$@"; do
    echo "== gpu_bench.sh: $part"
    case "$part" in
        step) timeout 300 python -m benchmarks.step_time --device cuda --model 1b --layers 4 --rank 512 \
                  --steps 12 --gap 8 --warmup 1 --optimizers adamw adamw-fused galore-torch galore fira frugal dct galore8bit dct8bit bnb-adamw8bit \
                  --kernel-backends auto torch ;;
        adapters) timeout 120 python -m benchmarks.adapters --device cuda ;;
        memory7b) timeout 420 python -m benchmarks.llama7b_memory --time-budget 300 ;;
        convergence) timeout 580 python -m benchmarks.convergence_gpu ;;
    esac
    rc=$?
    [ "$rc" -eq 0 ] || { echo "gpu_bench.sh: $part ended with status $rc" >&2; status=$rc; }
done
exit "$status"
