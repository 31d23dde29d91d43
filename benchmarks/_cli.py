"""How a benchmark is started and how it records that in its results file: ``python -m benchmarks.NAME ARGS``."""

from __future__ import annotations

import os
import shlex
import sys


def invocation(file: str) -> str:
    """``python -m benchmarks.NAME`` for the benchmark module defined in ``file``: its argparse ``prog``."""
    return f"python -m {__package__}.{os.path.splitext(os.path.basename(file))[0]}"


def command_line(file: str, argv: list[str] | None, env: str = "") -> str:
    """The command that reproduces a run, for its results file: ``env`` (variables the run was started with that
    change what it does, e.g. ``DS_ACCELERATOR=cpu``), the invocation, and the arguments (``sys.argv[1:]`` when
    ``argv`` is None) quoted for a POSIX shell."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([*([env] if env else []), invocation(file), *map(shlex.quote, args)])


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# A --quick run checks that a benchmark works, not what it measures: by default its tables go here (ignored by git),
# never over the committed tables in results/.
QUICK_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "benchmarks-quick")


def results_dir(quick: bool) -> str:
    """Where a benchmark writes its tables when no ``--out``/``--out-dir`` is given: ``benchmarks/results`` for a
    full run, ``runs/benchmarks-quick`` for a ``--quick`` one."""
    return QUICK_RESULTS if quick else RESULTS
