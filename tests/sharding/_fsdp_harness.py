"""Launch named cases on W gloo ranks with torchrun, as a user launches a script, and read back what each rank
returned.

One launch runs many cases (starting the ranks dominates the time): each case is a function of
``tests/sharding/_fsdp_worker.py`` that every rank calls in turn; what it returns (tensors, numbers, strings
in dicts and lists) is saved per rank and loaded here. A rank that raises writes its traceback and exits at
once, so torchrun stops the others instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cases(world: int, cases: list[str], timeout: int = 300, env: dict | None = None) -> dict[tuple[int, str], object]:
    """``{(rank, case): returned value}`` for every rank and case, run in one torchrun launch of ``world`` ranks."""
    with tempfile.TemporaryDirectory(prefix="slimtrain-fsdp-") as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   "-m", "tests.sharding._fsdp_worker", "--out", out, "--cases", ",".join(cases)]
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join([ROOT, full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
        errors = sorted(n for n in os.listdir(out) if n.endswith(".error"))
        if errors:  # every rank's: the first to fail is the cause, the others often lost a peer
            report = []
            for name in errors:
                with open(os.path.join(out, name)) as f:
                    report.append(f"{name[:-6]} failed:\n{f.read()}")
            pytest.fail("\n".join(report))
        if proc.returncode != 0:
            pytest.fail(f"torchrun exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        results = {}
        for rank in range(world):
            for case in cases:
                path = os.path.join(out, f"{case}.rank{rank}.pt")
                results[(rank, case)] = torch.load(path, weights_only=True)
        return results
