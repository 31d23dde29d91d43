"""What a recipe may do to its ``--out`` directory: create it, claim it, and clear only its own files.

A run writes :data:`MARKER` (``slimtrain-run.json``) into ``--out`` before any other file; the marker
names the recipe and the outputs it writes there. ``--overwrite`` then removes exactly those names and
nothing else in the directory; a directory without a marker (someone else's, or a run made before
markers existed) is refused, because a ``config.json`` or a ``checkpoint/`` there may not be ours.

The checks raise ``ValueError`` naming the option and the path, for the recipes' one-line errors.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile

MARKER = "slimtrain-run.json"


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


def check_overwritable(out: str) -> None:
    """Refuse ``--overwrite`` of a non-empty ``out`` that no slimtrain run claimed with a marker."""
    if not os.path.isdir(out) or not os.listdir(out) or os.path.isfile(os.path.join(out, MARKER)):
        return
    raise ValueError(
        f"Invalid --overwrite: {out!r} has no {MARKER}, so slimtrain cannot tell its files from others "
        "(not a slimtrain run, or one made before runs wrote markers): remove what you no longer need "
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
    return [n for n in names if isinstance(n, str) and n and n == os.path.basename(n) and n not in (".", "..")]


def clear(out: str) -> None:
    """Remove what the marker in ``out`` lists (``--overwrite``), then the marker; nothing else."""
    for name in owned_outputs(out):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    if os.path.lexists(os.path.join(out, MARKER)):
        os.remove(os.path.join(out, MARKER))


def claim(out: str, recipe: str, outputs: list[str]) -> None:
    """Create ``out`` if needed and write the marker naming ``recipe`` and the ``outputs`` it will write."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, MARKER)
    with open(path + ".tmp", "w") as f:
        json.dump({"recipe": recipe, "outputs": list(outputs)}, f, indent=2)
    os.replace(path + ".tmp", path)


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
