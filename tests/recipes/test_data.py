import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtrain.recipes.data import (
    BlockBatches,
    check_files,
    decode,
    encode,
    eval_batches,
    load_splits,
    split_by_document,
)
from slimtrain.recipes.shakespeare import shakespeare_files


def _long_lines(paths, min_len=50):
    out = set()
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            out.update(" ".join(line.split()) for line in f if len(line.strip()) >= min_len)
    return out


def test_shakespeare_corpus_has_one_edition_per_work():
    files = shakespeare_files()
    names = [os.path.basename(f) for f in files]
    assert len(files) == 42
    assert not [n for n in names if n.endswith("_gut_f.txt") or n == "metadata.txt"]


def test_split_by_play_has_no_overlap():
    train, val = split_by_document(shakespeare_files())
    assert val and train
    assert not set(train) & set(val)
    assert len(train) + len(val) == 42
    # No line of verse or prose (>= 50 characters) of a validation play appears in a training play.
    assert not _long_lines(train) & _long_lines(val)


def test_split_is_deterministic_and_order_independent():
    files = shakespeare_files()
    assert split_by_document(files, seed=0) == split_by_document(list(reversed(files)), seed=0)
    assert split_by_document(files, seed=0) != split_by_document(files, seed=1)


def test_single_file_is_split_inside(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 100)
    splits = load_splits([str(path)], val_fraction=0.1)
    assert len(splits.train) == 900 and len(splits.val) == 100


def test_check_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Invalid --data: file.*not found.*missing.txt"):
        check_files([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="Invalid --data: empty file"):
        check_files([str(tmp_path / "empty.txt")])


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tokens = encode(text)
    assert tokens.dtype == torch.uint8 and len(tokens) == len(text.encode("utf-8"))
    assert decode(tokens) == text


def _tokens(n=10_000):
    return torch.arange(n, dtype=torch.int64).remainder(251).to(torch.uint8)


def test_batches_are_a_function_of_seed_and_step():
    a, b = BlockBatches(_tokens(), 4, 16, seed=3), BlockBatches(_tokens(), 4, 16, seed=3)
    for step in range(30):  # crosses epochs: 624 blocks / 4 = 156 batches per epoch, so check a late step too
        a.batch(step)
    for step in (29, 0, 500, 7):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], BlockBatches(_tokens(), 4, 16, seed=4).batch(0)[0])


def test_batches_shift_targets_and_cover_an_epoch_without_repeats():
    bb = BlockBatches(_tokens(), 4, 16, seed=0)
    x, y = bb.batch(0)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    per_epoch = bb.n_blocks // 4
    ids = torch.cat([bb.block_ids(s) for s in range(per_epoch)])
    assert len(ids.unique()) == len(ids) == per_epoch * 4


def test_eval_batches_are_fixed_and_spread():
    tokens = _tokens()
    first = list(eval_batches(tokens, 4, 16, max_batches=3))
    second = list(eval_batches(tokens, 4, 16, max_batches=3))
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    # Spread over the whole stream, not the first 12 blocks only.
    last_block = (len(tokens) - 1) // 16 - 1
    assert int(first[-1][0][-1, 0]) == int(tokens[last_block * 16])


def test_too_short_text_is_refused():
    with pytest.raises(ValueError, match="Invalid seq_len/batch_size"):
        BlockBatches(_tokens(100), 8, 16)
