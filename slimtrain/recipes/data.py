"""The pretrain recipe's task: next-byte prediction on plain text, split by document, in seeded batches.

The text is Shakespeare's works by default (:func:`~slimtrain.recipes.shakespeare.shakespeare_files`) or
any text files (``--data``), one document each. Tokens are raw UTF-8 bytes (vocabulary 256): no download,
any text file works, and the loss in nats per byte is comparable across corpora. Batches are a pure
function of ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted one would, with
nothing to checkpoint but the step; :func:`fingerprint` (the files' SHA-256) lets a resume check that the
text is still the same.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .._seeds import data_order_seed, generator
from .shakespeare import shakespeare_files

VOCAB_SIZE = 256  # byte-level
DOCUMENT_SEPARATOR = b"\n\n"


def check_files(paths: Sequence[str]) -> list[str]:
    """Raise one clear error for missing or empty files; return the paths deduplicated, in order."""
    if not paths:
        raise ValueError("Invalid --data: no files given (expected one or more text files)")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"Invalid --data: file(s) not found: {', '.join(missing)}")
    empty = [p for p in paths if os.path.getsize(p) == 0]
    if empty:
        raise ValueError(f"Invalid --data: empty file(s): {', '.join(empty)}")
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def split_by_document(
    paths: Sequence[str], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split files (one per play) into train and validation sets; no file is on both sides.

    The order depends only on the file *names* and ``seed``, not on the order the caller passed them in
    or on the filesystem. At least one file goes to each side; with a single file there is no split by
    document, and the caller splits inside it (see :func:`load_splits`).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {val_fraction} (expected 0 < val_fraction < 1)")
    paths = sorted(paths, key=lambda p: (os.path.basename(p), p))
    if len(paths) < 2:
        return list(paths), []
    random.Random(seed).shuffle(paths)
    n_val = min(len(paths) - 1, max(1, round(val_fraction * len(paths))))
    val, train = paths[:n_val], paths[n_val:]
    return sorted(train), sorted(val)


def _as_tensor(data: bytes) -> torch.Tensor:
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a uint8 tensor."""
    return _as_tensor(text.encode("utf-8"))


def decode(tokens: torch.Tensor | Sequence[int]) -> str:
    return bytes(torch.as_tensor(tokens, dtype=torch.uint8).tolist()).decode("utf-8", errors="replace")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(paths: Sequence[str]) -> dict[str, str]:
    """``{path: SHA-256 of its bytes}``: what a run records of its text, and a resume compares."""
    return {p: sha256_file(p) for p in paths}


def read_tokens(paths: Sequence[str], digests: dict[str, str] | None = None) -> torch.Tensor:
    """The files' bytes, concatenated with a blank line between documents, as a uint8 tensor; the SHA-256
    of each file's bytes as read goes into ``digests``."""
    chunks = []
    for p in paths:
        with open(p, "rb") as f:
            raw = f.read()
        if digests is not None:
            digests[p] = hashlib.sha256(raw).hexdigest()
        chunks.append(raw.strip())
    return _as_tensor(DOCUMENT_SEPARATOR.join(chunks))


@dataclass
class Splits:
    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str]
    val_files: list[str]
    sha256: dict[str, str] = field(default_factory=dict)  # of every file's bytes as read: the run's fingerprint


def load_splits(paths: Sequence[str] | None = None, val_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Token streams for training and validation. ``paths=None`` means the Shakespeare corpus.

    With one file, the last ``val_fraction`` of its bytes is the validation stream.
    """
    paths = shakespeare_files() if paths is None else check_files(paths)
    train_files, val_files = split_by_document(paths, val_fraction, seed)
    digests: dict[str, str] = {}
    if val_files:
        train, val = read_tokens(train_files, digests), read_tokens(val_files, digests)
        return Splits(train, val, train_files, val_files, {p: digests[p] for p in paths})
    tokens = read_tokens(train_files, digests)
    cut = int(len(tokens) * (1.0 - val_fraction))
    return Splits(tokens[:cut], tokens[cut:], train_files, train_files, {p: digests[p] for p in paths})


class BlockBatches:
    """Fixed-length blocks of a token stream, drawn without replacement, epoch after epoch.

    Block ``k`` is ``tokens[k*L : k*L + L + 1]`` (inputs and shifted targets). The blocks of epoch ``e``
    come in the order of a permutation seeded by ``(seed, e)``, so the batch for any step can be rebuilt
    from ``(seed, step)`` alone: this is what makes resume exact.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected >= 1)")
        if seq_len < 1:
            raise ValueError(f"Invalid seq_len: {seq_len} (expected >= 1)")
        self.n_blocks = (len(tokens) - 1) // seq_len
        if self.n_blocks < batch_size:
            raise ValueError(
                f"Invalid seq_len/batch_size: {seq_len}/{batch_size} need {batch_size * seq_len + 1} tokens, "
                f"the training text has {len(tokens)}"
            )
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self._epoch, self._order = -1, None

    def _block_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = generator(data_order_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(self.n_blocks, generator=g)
        return self._order

    def block_ids(self, step: int) -> torch.Tensor:
        """Indices of the blocks in batch ``step`` (0-based). Batches never straddle two epochs."""
        per_epoch = self.n_blocks // self.batch_size
        epoch, i = divmod(step, per_epoch)
        return self._block_order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, both int64 of shape ``(batch_size, seq_len)``."""
        starts = self.block_ids(step) * self.seq_len
        rows = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()]).long()
        return rows[:, :-1], rows[:, 1:]


def eval_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of validation batches: up to ``max_batches * batch_size`` blocks spread evenly over
    the stream (so every validation play contributes), the same at every evaluation."""
    n_blocks = (len(tokens) - 1) // seq_len
    if n_blocks < 1:
        raise ValueError(f"Invalid seq_len: {seq_len} is longer than the validation text ({len(tokens)} tokens)")
    n = min(n_blocks, max_batches * batch_size)
    starts = torch.linspace(0, n_blocks - 1, n).round().long().unique() * seq_len
    for chunk in starts.split(batch_size):
        rows = torch.stack([tokens[s : s + seq_len + 1] for s in chunk.tolist()]).long()
        yield rows[:, :-1], rows[:, 1:]
