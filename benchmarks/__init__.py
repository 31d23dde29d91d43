"""One script per question, each writing its table to ``benchmarks/results/`` with the command that made it.

Run a benchmark as a module from the repository root::

    python -m benchmarks.step_time --help

A script started by its path has its own folder put first on ``sys.path``, where a benchmark named like a package
that a dependency imports would be found in place of that package; ``-m`` puts the repository root there instead.
No module here takes such a name either: ``tests/test_benchmark_commands.py`` compares every name with the
top-level names of the installed distributions.
"""
