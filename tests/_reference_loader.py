"""Today's (before Grain) in-memory loader of jlora.data, kept verbatim as the oracle that tests/test_data.py compares
the Grain pipeline's batches against."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from jlora.data import Example


def _round_up(n, multiple, cap):
    return cap if not multiple else min(cap, max(multiple, math.ceil(n / multiple) * multiple))


def _empty(batch_size: int, length: int, pad_id: int, packing: bool) -> dict[str, np.ndarray]:
    b = {"input_ids": np.full((batch_size, length), pad_id, np.int32),
         "attention_mask": np.zeros((batch_size, length), np.int32),
         "loss_mask": np.zeros((batch_size, length), np.int32)}
    if packing:
        b["positions"] = np.zeros((batch_size, length), np.int32)
        b["segment_ids"] = np.zeros((batch_size, length), np.int32)
    return b


def _put(batch, row: int, start: int, ex: Example, segment: int | None) -> int:
    """Writes ``ex`` into ``batch`` at ``row, start:``; returns where the next example may start. The example's first
    token is never a target: nothing of its own precedes it (in a packed row, the previous example's last token)."""
    n = len(ex)
    batch["input_ids"][row, start:start + n] = ex.input_ids
    batch["attention_mask"][row, start:start + n] = 1
    batch["loss_mask"][row, start:start + n] = ex.loss_mask
    batch["loss_mask"][row, start] = 0
    if segment is not None:
        batch["positions"][row, start:start + n] = np.arange(n)
        batch["segment_ids"][row, start:start + n] = segment
    return start + n


class Loader:
    """An iterator of batches in a seeded, resumable order (see the module docstring).

    Args:
        examples: tokenized examples, each at most ``max_length`` long.
        batch_size: rows per batch.
        max_length: the longest row (packing: every row's length).
        pad_id: the id written on padding (masked out everywhere; the tokenizer's pad or EOS id is usual).
        seed: the shuffling seed; epoch e's order is a permutation drawn from ``(seed, e)``.
        shuffle: False keeps the examples' order (evaluation).
        packing: pack several examples per row instead of padding one per row.
        bucket: padding rounds row lengths up to a multiple of this (None: always ``max_length``).
        drop_last: skip an epoch's tail that cannot fill a batch (else pad it with empty rows).
        epochs: stop after this many epochs (None: never stop).
        position: where to start, a `position` dict saved earlier (default: the beginning).
    """

    def __init__(self, examples: Sequence[Example], *, batch_size: int, max_length: int, pad_id: int,
                 seed: int = 0, shuffle: bool = True, packing: bool = False, bucket: int | None = 16,
                 drop_last: bool = True, epochs: int | None = None, position: Mapping[str, int] | None = None):
        if not examples:
            raise ValueError("the dataset is empty; a Loader needs at least one example")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}")
        longest = max(examples, key=len)
        if len(longest) > max_length:
            raise ValueError(f"{longest.source or 'an example'} has {len(longest)} tokens, more than "
                             f"max_length={max_length}; tokenize with the same max_length (tokenize_all applies "
                             f"the overflow policy)")
        if drop_last and not packing and len(examples) < batch_size:
            raise ValueError(f"the dataset has {len(examples)} examples, fewer than batch_size={batch_size}, so "
                             f"with drop_last no batch can be formed; lower `batch_size` or add data")
        self._examples = list(examples)
        self._batch_size, self._max_length, self._pad_id = batch_size, max_length, int(pad_id)
        self._seed, self._shuffle, self._packing = seed, shuffle, packing
        self._bucket, self._drop_last, self._epochs = bucket, drop_last, epochs
        position = dict(position or {"epoch": 0, "index": 0})
        if set(position) != {"epoch", "index"}:
            raise ValueError(f"`position` must be a dict with keys 'epoch' and 'index'; got {position!r}")
        epoch, index = int(position["epoch"]), int(position["index"])
        if epoch < 0 or not 0 <= index <= len(examples):
            raise ValueError(f"`position` {position} is outside this dataset of {len(examples)} examples; was it "
                             f"saved for different data?")
        self._epoch, self._index = epoch, index
        self._order_epoch, self._order = -1, np.arange(0)

    @property
    def position(self) -> dict[str, int]:
        """Where the next batch starts: ``{"epoch": e, "index": i}`` (JSON-able; pass it back as ``position``)."""
        return {"epoch": self._epoch, "index": self._index}

    def order(self, epoch: int) -> np.ndarray:
        """The example indices of ``epoch``, in the order they are batched."""
        if epoch != self._order_epoch:
            n = len(self._examples)
            self._order = (np.random.default_rng([self._seed, epoch]).permutation(n) if self._shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        for _ in range(2):  # at most one epoch rollover: a fresh epoch always yields a batch
            if self._epochs is not None and self._epoch >= self._epochs:
                raise StopIteration
            taken = self._take(self.order(self._epoch), self._index)
            if taken is not None:
                batch, self._index = taken
                return batch
            self._epoch, self._index = self._epoch + 1, 0
        raise ValueError(f"a whole epoch of {len(self._examples)} examples cannot fill one batch of "
                         f"{self._batch_size} packed rows of {self._max_length} tokens; lower `batch_size`, or "
                         f"pass drop_last=False")

    def _take(self, order: np.ndarray, start: int) -> tuple[dict[str, np.ndarray], int] | None:
        """The batch starting at ``order[start]`` and the next start, or None at the end of the epoch."""
        n, bs = len(order), self._batch_size
        if start >= n:
            return None
        if not self._packing:
            stop = min(start + bs, n)
            if stop - start < bs and self._drop_last:
                return None
            chosen = [self._examples[i] for i in order[start:stop]]
            batch = _empty(bs, _round_up(max(map(len, chosen)), self._bucket, self._max_length), self._pad_id, False)
            for row, ex in enumerate(chosen):
                _put(batch, row, 0, ex, None)
            return batch, stop
        batch = _empty(bs, self._max_length, self._pad_id, True)
        row, col, segment, i = 0, 0, 0, start
        while i < n:
            ex = self._examples[order[i]]
            if col + len(ex) > self._max_length:
                row, col, segment = row + 1, 0, 0
                if row == bs:
                    break
            segment += 1
            col = _put(batch, row, col, ex, segment)
            i += 1
        full = row == bs or (row == bs - 1 and i == n and col > 0)
        if not full and self._drop_last:
            return None
        return batch, i

