"""What the pretrain recipes write besides their checkpoint: ``metrics.csv``, ``loss.png``, ``summary.json``.

``metrics.csv`` has one row per step, ``step, train_loss, val_loss, lr, tokens, elapsed_s, tokens_per_s``
(:data:`FIELDS`), ``val_loss`` empty between validation passes. The log only grows by whole lines (one
``write`` each), and a resume rewrites it through a temporary file; a torn or malformed line (a copy cut
short, a run killed mid-write) is dropped with a warning when the log is read back (:func:`read_metrics`).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys

from .outputs import write_atomic, write_csv, write_json

METRICS, PLOT, SUMMARY = "metrics.csv", "loss.png", "summary.json"
FIELDS = ("step", "train_loss", "val_loss", "lr", "tokens", "elapsed_s", "tokens_per_s")


def check_header(path: str, first: list[str]) -> None:
    """Refuse a log whose first line is not the header (``ValueError`` for ``--resume``)."""
    if next(csv.reader(first), None) != list(FIELDS):
        raise ValueError(f"Invalid --resume: {path} does not start with the header line {','.join(FIELDS)}")


def check_log(out: str) -> None:
    """Refuse to resume a run whose ``metrics.csv`` is missing or does not start with the header."""
    path = os.path.join(out, METRICS)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Invalid --resume: no {METRICS} in {out} (the run's log): restore it, or put a file there "
            f"holding only the header line {','.join(FIELDS)} to continue without the earlier rows"
        )
    with open(path, newline="") as f:
        check_header(path, [f.readline()])


def read_metrics(path: str) -> list[dict]:
    """The rows of a ``metrics.csv``, without the lines a crash or a cut copy left malformed.

    A malformed line (a torn last line, fields missing or not numbers) is dropped, with one warning on
    stderr naming the file and the lines: the run goes on from its checkpoint, those steps stay unlogged.
    """
    with open(path, newline="") as f:
        lines = f.read().splitlines(keepends=True)
    check_header(path, lines[:1])
    rows, dropped = [], []
    for number, line in enumerate(lines[1:], start=2):
        row = _parse(line)
        if row is None:
            dropped.append(f"{number}: {line.rstrip()[:40]!r}")
        else:
            rows.append(row)
    if dropped:
        print(f"warning: {path}: dropped {len(dropped)} malformed line(s), torn by a crash or a cut copy "
              f"(line {'; line '.join(dropped)})", file=sys.stderr)
    return rows


def _parse(line: str) -> dict | None:
    """One ``metrics.csv`` line as a row, or None if it is not a whole, well-formed one."""
    if not line.endswith("\n"):
        return None  # torn: every line is written whole, newline last
    fields = next(csv.reader([line]), [])
    if len(fields) != len(FIELDS):
        return None
    row = dict(zip(FIELDS, fields))
    try:
        int(row["step"]), int(row["tokens"])
        for key in ("train_loss", "lr", "elapsed_s", "tokens_per_s"):
            float(row[key])
        if row["val_loss"]:
            float(row["val_loss"])
    except ValueError:
        return None
    return row


def open_log(out: str, resumed_at: int | None) -> list[dict]:
    """Start ``metrics.csv`` in ``out``: empty, or, for a run resumed at step ``resumed_at``, with the
    rows up to it (the steps after its checkpoint are run again). Returns those rows."""
    path = os.path.join(out, METRICS)
    rows = [] if resumed_at is None else [r for r in read_metrics(path) if int(r["step"]) <= resumed_at]
    write_metrics(path, rows)
    return rows


def write_metrics(path: str, rows: list[dict]) -> None:
    """Replace the log with ``rows``, through a temporary file: a crash leaves the old log or the new one."""
    write_csv(path, FIELDS, rows)


def append_metric(path: str, row: dict) -> None:
    """Append one row as one ``write`` of the whole line (never a partial line, short of a full disk)."""
    line = io.StringIO()
    csv.DictWriter(line, FIELDS).writerow(row)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = line.getvalue().encode()
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path} (disk full?)")
    finally:
        os.close(fd)


def plot(rows: list[dict], path: str, title: str) -> None:
    """The train and validation loss curves of ``rows`` to a PNG."""
    plot_curves({"train": ([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows]),
                 "validation": ([int(r["step"]) for r in rows if r["val_loss"]],
                                [float(r["val_loss"]) for r in rows if r["val_loss"]])},
                path, title)


def plot_curves(curves: dict[str, tuple[list, list]], path: str, title: str) -> None:
    """Loss curves to a PNG; a curve named ``train`` (or ending in ``(train)``) is drawn thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (steps, losses) in curves.items():
        thin = label == "train" or label.endswith("(train)")
        ax.plot(steps, losses, label=label, lw=0.8 if thin else 1.8, alpha=0.6 if thin else 1.0,
                marker=None if thin else "o", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def summary(cfg, rows: list[dict], backend: dict, elapsed: float, train_time: float) -> dict:
    """``summary.json``'s fields: the run's settings and final losses from ``rows``, times, and ``backend``'s
    (device, dtype, peak memory, optimizer state)."""
    vals = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    final_val = vals[-1][1] if vals else None
    return dict(
        optimizer=cfg.optimizer,
        model=cfg.model,
        steps=int(rows[-1]["step"]) if rows else 0,
        final_train_loss=float(rows[-1]["train_loss"]) if rows else None,
        final_val_loss=final_val,
        val_perplexity=math.exp(final_val) if final_val is not None else None,
        val_history=vals,
        elapsed_s=elapsed,
        train_s=train_time,
        tokens_per_s=float(rows[-1]["tokens_per_s"]) if rows else None,
        **backend,
    )


def write_summary(out: str, result: dict) -> None:
    write_json(os.path.join(out, SUMMARY), result)


def last_val(rows: list[dict]) -> str:
    """The latest validation loss in ``rows``, for the progress bar."""
    return next((r["val_loss"][:5] for r in reversed(rows) if r["val_loss"]), "-")


_PEAK_WORDS = {"cuda_max_memory_allocated": "CUDA tensors", "cpu_peak_rss": "process RSS"}


def print_summary(cfg, result: dict) -> None:
    """The run's one-line result: final validation loss, or where a stopped run stands."""
    if result["steps"] == cfg.steps:
        print(f"final val loss {result['final_val_loss']:.4f} (perplexity {result['val_perplexity']:.2f}) "
              f"after {result['steps']} steps, {result['elapsed_s']:.0f} s, {result['tokens_per_s']:.0f} tokens/s; "
              f"optimizer state {result['optimizer_state_bytes'] / 2**20:.2f} MiB; peak memory "
              f"{result['peak_memory_bytes'] / 2**30:.2f} GiB ({_PEAK_WORDS[result['peak_memory_source']]}); "
              f"outputs in {cfg.out}")
    else:
        print(f"stopped after {result['steps']} steps; continue with --resume (outputs in {cfg.out})")
