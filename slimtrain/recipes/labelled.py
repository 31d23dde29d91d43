"""Your labelled text for the finetune recipe (``--data FILE``): read, checked line by line, split per label.

One example per line: ``.txt`` as ``label<TAB>text``, ``.jsonl`` as ``{"text": "...", "label": "..."}``
(a string or integer label; other keys ignored); blank lines are skipped, and so is a UTF-8 byte-order
mark at the start of the file (an editor's, not part of the first label). The classes are the file's
labels, sorted, or ``--labels a,b,c`` in that order. Each label gives ``--test-fraction`` of its
examples (at least one, and one left to train) to the test set, by a seeded draw.
"""

from __future__ import annotations

import json
import os
import random

DATA_FORMATS = ('.txt (a line per example: label<TAB>text) or .jsonl (a line per example: '
                '{"text": "...", "label": "..."})')


def read_examples(path: str) -> list[tuple[str, str, int]]:
    """``(text, label, line number)`` for each non-blank line of a ``--data`` file (:data:`DATA_FORMATS`).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and line of the
    first line that is not an example."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".jsonl"):
        raise ValueError(f"Invalid --data: {path!r} (expected {DATA_FORMATS})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Invalid --data: file not found: {path}")
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a leading byte-order mark is dropped
            for number, line in enumerate(f, start=1):
                if line.strip():
                    rows.append((*_example(path, number, line, ext), number))
    except UnicodeDecodeError as e:
        raise ValueError(f"Invalid --data: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise ValueError(f"Invalid --data: {path} holds no examples (expected {DATA_FORMATS})")
    return rows


def _example(path: str, number: int, line: str, ext: str) -> tuple[str, str]:
    """``(text, label)`` of one non-blank line; ``ValueError`` naming the file and line if it is not one."""
    if ext == ".txt":
        label, tab, text = line.rstrip("\r\n").partition("\t")
        if not (tab and label.strip() and text.strip()):
            raise ValueError(f"Invalid --data: {path} line {number}: expected label<TAB>text, got {line.strip()[:40]!r}")
        return text.strip(), label.strip()
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"Invalid --data: {path} line {number}: not JSON ({e.msg})") from None
    label, text = (obj.get("label"), obj.get("text")) if isinstance(obj, dict) else (None, None)
    if not (isinstance(text, str) and text.strip()) or isinstance(label, bool) or \
            not isinstance(label, (str, int)) or not str(label).strip():
        raise ValueError(f"Invalid --data: {path} line {number}: expected an object with a non-empty "
                         '"text" string and a "label" (string or integer)')
    return text.strip(), str(label).strip()


def check_labels(path: str, rows: list[tuple[str, str, int]], labels: list[str] | None) -> list[str]:
    """The classes: ``labels`` (``--labels``, every example's label among them) or the file's, sorted."""
    found = sorted({label for _, label, _ in rows})
    if labels is None:
        labels = found
    else:
        labels = [label.strip() for label in labels]
        if len(set(labels)) != len(labels) or not all(labels):
            raise ValueError(f"Invalid --labels: {','.join(labels)!r} (expected distinct, non-empty names)")
        for _, label, number in rows:
            if label not in labels:
                raise ValueError(f"Invalid --data: {path} line {number}: unknown label {label!r} "
                                 f"(--labels is {','.join(labels)})")
    if len(labels) < 2:
        raise ValueError(f"Invalid --data: {path} has {len(labels)} label(s) ({', '.join(labels)}); expected at least 2")
    return labels


def split_examples(rows: list[tuple[str, str, int]], labels: list[str], test_fraction: float, seed: int):
    """Stratified split of ``--data`` examples, as the plays are split: each label gives
    ``round(test_fraction * n)`` of its ``n`` examples, at least one and at most ``n - 1``, to the test
    set. Returns ``(train, test)`` lists of ``(text, label index)``, in a seeded order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid --test-fraction: {test_fraction} (expected 0 < test-fraction < 1)")
    rng = random.Random(seed)
    train, test = [], []
    for k, label in enumerate(labels):
        members = [text for text, lab, _ in rows if lab == label]
        if len(members) < 2:
            raise ValueError(f"Invalid --data: label {label!r} has {len(members)} example(s) (expected at least 2: "
                             "one to train on, one to test)")
        rng.shuffle(members)
        n_test = min(len(members) - 1, max(1, int(test_fraction * len(members) + 0.5)))
        test += [(t, k) for t in members[:n_test]]
        train += [(t, k) for t in members[n_test:]]
    rng.shuffle(train)
    return train, test


def labelled_examples(path: str, labels: list[str], test_fraction: float, max_train: int | None, seed: int):
    """``(train, test)`` of the ``--data`` file, the training examples capped at ``max_train`` (a seeded sample)."""
    train, test = split_examples(read_examples(path), labels, test_fraction, seed)
    if max_train is not None and max_train < len(train):
        train = random.Random(seed).sample(train, max_train)
    return train, test
