"""A recipe's ``--out`` directory: who owns it, what it records, and how its files are written.

Ownership. A run holds an exclusive lock (``fcntl.flock``) on :data:`LOCK` (``slimtrain-run.lock``) in
``--out`` from before its first write until it ends; the lock file holds the owner's pid and host. The
operating system drops the lock when the process exits, however it exits (a crash, ``kill -9``), so a
stale lock file never blocks a later run. A second run into a directory that is in use is refused at
once. The recipes check ``--out`` twice: before any heavy work, for an early error, and again under
the lock (:func:`own`), which is the check that counts: the directory may have changed in between.

The marker. A run then writes :data:`MARKER` (``slimtrain-run.json``) before any other file; it names the
recipe and the outputs it writes there. ``--overwrite`` removes exactly those names and nothing else; a
directory without a marker (someone else's, or a run of a slimtrain without markers) is refused,
because a ``config.json`` or a ``checkpoint/`` there may not be ours. The lock file is never removed:
deleting a lock file while another process waits on it would let two runs lock two different files.

Records. :data:`CONFIG` (``config.json``) holds the run's arguments and, for the pretrain recipes,
``data_sha256``: the SHA-256 of each data file as read. ``--resume`` refuses to continue on data whose
fingerprint differs (:func:`check_fingerprint`) unless told ``--allow-data-change``.

Writes. Checkpoints, the config and the summaries go to a temporary file that is then renamed
(:func:`write_atomic`): an interrupted write leaves the previous file, and a failed one (a full disk)
removes its temporary file, so the space it took is free again for ``--resume``.

The checks raise ``ValueError`` naming the option and the path, for the recipes' one-line errors.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import shutil
import socket
import sys
import zipfile
from typing import BinaryIO, Callable, Iterator

MARKER = "slimtrain-run.json"
LOCK = "slimtrain-run.lock"
CONFIG = "config.json"
FINGERPRINT = "data_sha256"  # config.json key: {data file: SHA-256 of its bytes}
FINGERPRINT_FROM = "data_sha256_from_step"  # set when a resume recorded the fingerprint: it holds from there
# The errors of a full disk or of a quota: the run stops, its last good checkpoint is intact.
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class Refused(ValueError):
    """The run may not use ``--out``: another run holds it, or it changed since the checks."""


class WriteError(RuntimeError):
    """A run could not write one of its files (a full disk); the message says what survives."""


def check_out_writable(out: str, option: str = "--out") -> None:
    """Refuse an ``out`` that is a file, lies under a file, or cannot be created or written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"Invalid {option}: {out!r} is a file (expected a directory)")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"Invalid {option}: {out!r} is under {existing!r}, which is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == os.path.abspath(out) else "would be created in"
        raise ValueError(f"Invalid {option}: {out!r} {what} {existing!r}, which is not writable")


def check_new(out: str, overwrite: bool, resumable: bool) -> None:
    """Refuse to start a run in a non-empty ``out`` unless ``--overwrite`` may clear it (its marker says what)."""
    if overwrite:
        check_overwritable(out)
    elif os.path.isdir(out) and set(os.listdir(out)) - {LOCK}:
        flags = "pass --resume to continue it or --overwrite to replace it" if resumable else "pass --overwrite to replace it"
        raise ValueError(f"Invalid --out: {out!r} is not empty ({flags})")


def check_overwritable(out: str) -> None:
    """Refuse ``--overwrite`` of a non-empty ``out`` that no slimtrain run claimed with a marker."""
    if not os.path.isdir(out) or not set(os.listdir(out)) - {LOCK} or os.path.isfile(os.path.join(out, MARKER)):
        return
    raise ValueError(
        f"Invalid --overwrite: {out!r} has no {MARKER}, so slimtrain cannot tell its files from others "
        "(not a slimtrain run, or one made without markers): remove what you no longer need "
        "yourself, or pick a new --out"
    )


def owned_outputs(out: str) -> list[str]:
    """The names the marker in ``out`` says a slimtrain run wrote there (empty without a marker)."""
    path = os.path.join(out, MARKER)
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            names = json.load(f)["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"Invalid --overwrite: {path} is unreadable ({e}): remove the files yourself") from None
    # Plain names directly under `out` only: a damaged or edited marker never reaches outside the run.
    return [n for n in names
            if isinstance(n, str) and n and n == os.path.basename(n) and n not in (".", "..", LOCK)]


def clear(out: str) -> None:
    """Remove what the marker in ``out`` lists (``--overwrite``), the temporary files of those outputs
    (:func:`write_atomic`'s), then the marker; nothing else."""
    for name in owned_outputs(out):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    remove_temporary_files(out)
    if os.path.lexists(os.path.join(out, MARKER)):
        os.remove(os.path.join(out, MARKER))


def remove_temporary_files(out: str) -> None:
    """Remove ``<output>.tmp`` for each output the marker lists: what a killed run's last write left behind."""
    for name in owned_outputs(out):
        tmp = os.path.join(out, name + ".tmp")
        if os.path.isfile(tmp) and not os.path.islink(tmp):
            os.remove(tmp)


def claim(out: str, recipe: str, outputs: list[str]) -> None:
    """Create ``out`` if needed and write the marker naming ``recipe`` and the ``outputs`` it will write."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, MARKER), {"recipe": recipe, "outputs": list(outputs)})


# ----------------------------------------------------------------------------------------------
# Ownership


@contextlib.contextmanager
def own(out: str, check: Callable[[], object] = lambda: None) -> Iterator[None]:
    """Hold the lock on ``out`` (created if needed) for the ``with`` block, running ``check`` first under it.

    Raises :class:`Refused` naming the directory and the owner's pid if another process holds the lock,
    or with the message of what ``check`` raises (the recipe's ``--out`` checks, repeated now that no
    other run can change the directory under them).
    """
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").split()
            by = f" (pid {owner[0]} on {owner[1]})" if len(owner) == 2 else ""
            raise Refused(f"Invalid --out: {out!r} is in use by another slimtrain run{by}: wait for it to "
                          "end, or pick another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            check()
        except (ValueError, FileNotFoundError) as e:
            raise Refused(str(e)) from None
        yield
    finally:
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------------------------
# Records


def read_config(out: str) -> dict:
    """The arguments a run recorded in ``out`` (``FileNotFoundError``/``ValueError`` for ``--resume``)."""
    path = os.path.join(out, CONFIG)
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"Invalid --resume: no {CONFIG} at {path} (the arguments of the run to continue)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"Invalid --resume: {path} is not readable JSON ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"Invalid --resume: {path} holds a {type(saved).__name__} (expected the run's arguments)")
    return saved


def check_fingerprint(saved: dict, sha256: dict[str, str], allow_change: bool) -> list[str]:
    """Compare the data files' fingerprint recorded in a run's config with ``sha256``, the data's now.

    Returns the files whose contents changed (empty if none, or if the run recorded no fingerprint);
    raises ``ValueError`` naming the first one unless ``allow_change`` (``--allow-data-change``).
    """
    recorded = saved.get(FINGERPRINT)
    if not isinstance(recorded, dict):
        return []
    changed = sorted(p for p in {*recorded, *sha256} if recorded.get(p) != sha256.get(p))
    if changed and not allow_change:
        first = changed[0]
        more = f" and {len(changed) - 1} other file(s)" if len(changed) > 1 else ""
        raise ValueError(
            f"Invalid --resume: {first}{more} changed since the run started (SHA-256 {_short(recorded.get(first))} "
            f"then, {_short(sha256.get(first))} now), so the run would not go on as it began: restore the file, "
            "or pass --allow-data-change to continue on the new data"
        )
    return changed


def _short(digest: str | None) -> str:
    return "none" if digest is None else f"{digest[:12]}..."


def start_run(out: str, recipe: str, names: list[str], config: dict) -> None:
    """A new run in ``out``: remove what an earlier run's marker lists (``--overwrite``; nothing else),
    write the marker naming ``recipe`` and its outputs ``names``, and record ``config``."""
    clear(out)
    claim(out, recipe, names)
    write_json(os.path.join(out, CONFIG), config)


def resume_run(out: str, data: list[str], sha256: dict[str, str], allow_change: bool, step: int) -> None:
    """A resumed run in ``out``: remove what a cut-short write left, and record the data fingerprint
    ``sha256`` anew, with a warning, where the run recorded none or ``allow_change`` let it differ."""
    remove_temporary_files(out)
    saved = read_config(out)
    changed = check_fingerprint(saved, sha256, allow_change)
    path = os.path.join(out, CONFIG)
    if not isinstance(saved.get(FINGERPRINT), dict):
        warn(f"{path} records no data fingerprint (made by a slimtrain version that did not record one): "
             "resuming without checking that the data is unchanged; its fingerprint is recorded now, for "
             "later resumes")
    elif changed:
        warn(f"continuing on changed data (--allow-data-change): {', '.join(changed)}; the new fingerprint is "
             f"recorded in {path}")
    else:
        return
    write_json(path, {**saved, "data": data, FINGERPRINT: sha256, FINGERPRINT_FROM: step})


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Writes


def write_atomic(path: str, write: Callable[[BinaryIO], None], sync: bool = False) -> None:
    """Write ``path`` through ``path + ".tmp"`` and a rename: readers see the old file or the whole new one.

    On any failure after the temporary file is created it is removed (a full disk gets its space back); an
    error caused by an ``OSError`` is raised as that ``OSError``, with ``path`` as its ``filename``. A link in the temporary file's place is not
    written through (``O_NOFOLLOW``): what it points to is not the run's. ``sync`` flushes the data to the
    disk before the rename, so that a power loss cannot leave an empty file under the final name.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = _os_error(e)
        if cause is None:
            raise
        # torch.save's zip writer turns its file's OSError into a RuntimeError ("unexpected pos ...") as it
        # closes; the OSError says what happened.
        raise OSError(cause.errno, cause.strerror, cause.filename or path) from e


def _os_error(e: BaseException | None) -> OSError | None:
    """The first ``OSError`` in ``e``'s chain of causes and contexts, or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_json(path: str, obj) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_csv(path: str, fields: tuple[str, ...], rows: list[dict]) -> None:
    """A CSV file with a header line and ``rows`` (keys beyond ``fields`` ignored), written atomically."""
    def write(f: BinaryIO) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        f.write(text.getvalue().encode())

    write_atomic(path, write)


def write_error(e: OSError, last_checkpoint: int | None) -> WriteError:
    """The one-line error for a file a run could not write (``e``, one of :data:`OUT_OF_SPACE`), saying
    which checkpoint is the last good one."""
    where = f" writing {e.filename}" if e.filename else ""
    if last_checkpoint:
        after = f"the last good checkpoint is step {last_checkpoint}: free space, then continue with --resume"
    else:
        after = "no checkpoint was written: free space, then start the run again with --overwrite"
    return WriteError(f"{(e.strerror or str(e)).lower()}{where}; {after}")


def check_checkpoint_file(path: str) -> None:
    """Refuse an empty or truncated ``torch.save`` file (a zip archive whose directory is at its end)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ValueError("empty file")
        with zipfile.ZipFile(path):
            pass
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"Invalid --resume: {path} is not a readable checkpoint ({e}; empty or cut short, e.g. a full disk "
            "or an interrupted copy): restore it, or start the run again in a new --out"
        ) from None
