#!/usr/bin/env bash
# Set up (with the dev extra: test tools and the peer packages used as oracles) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[dev]"
# PEFT's own custom-model tests (tests/adapters/test_peft_conformance.py runs them over our configs): the sdist
# of the installed peft, unpacked into an ignored folder once; never copied into the repo.
peft_version="$(python -c 'import peft; print(peft.__version__)')"
if [ ! -f ".peft-sdist/peft-${peft_version}/tests/test_custom_models.py" ]; then
    python -m pip download -q --no-deps --no-binary :all: "peft==${peft_version}" -d .peft-sdist
    tar -xzf ".peft-sdist/peft-${peft_version}.tar.gz" -C .peft-sdist
fi
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q -p no:cacheprovider tests
