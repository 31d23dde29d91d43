# Sourced by gpu_check.sh and gpu_bench.sh (NAME: the calling script, for messages): refuse a machine whose
# torch sees no CUDA device; install $SLIMTRAIN_WHEELS/*.whl with --no-deps into a temporary side directory put
# on PYTHONPATH (never into the environment); put this checkout on PYTHONPATH; the environment the runs share.
python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else '$NAME: torch sees no CUDA device')" || exit 2
if [ -n "${SLIMTRAIN_WHEELS:-}" ]; then
    site="$(mktemp -d /tmp/slimtrain-site.XXXXXX)"
    python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$SLIMTRAIN_WHEELS"/*.whl \
        || { echo "$NAME: could not install the wheels in $SLIMTRAIN_WHEELS" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET SLIMTRAIN_KERNELS
