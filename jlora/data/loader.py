"""The Grain pipeline: records -> tokenized examples -> padded or packed batches, in a seeded, resumable order.

A :class:`Loader` reads from data files (:func:`jlora.data.open_source`: JSONL, Parquet, Arrow, ArrayRecord) or
from examples already in memory, through a Grain pipeline of transforms:

1. ``_Order`` (a ``grain.MapDataset``): position ``q`` of this process's stream -> the record it reads. Epoch e's
   order is a seeded permutation of all records (``numpy.random.default_rng([seed, e])``), the same on every process;
2. ``_Tokenize`` (a ``grain.transforms.Map``): reads the record, parses it (``columns`` mapping), tokenizes it with
   its loss mask and applies the ``overflow`` policy; a malformed record raises naming its file and line or row, or
   (``on_bad_record="skip"``) becomes a counted hole. With ``workers`` > 0 this runs in that many worker processes
   (``mp_prefetch``), each on every ``workers``-th position, merged back in order;
3. ``_Batches``: padding (one example per row; the row length is the batch's longest example rounded up to a
   multiple of ``bucket``, capped at ``max_length``) or packing (examples laid greedily, in order, into rows of
   exactly ``max_length``; ``positions`` restart at 0 and ``segment_ids`` count 1, 2, ... per example, 0 on padding).

Batches are dicts of numpy int32 arrays (``input_ids``, ``attention_mask``, ``loss_mask``; packing adds
``positions`` and ``segment_ids``). A packed example's first token is never a target (nothing of its own precedes
it), so no loss crosses from one example into the next; jlora's models attend only within a segment.

**Several processes** (multi-host): ``rows`` is the slice of the global batch this process builds
(:func:`jlora.parallel.local_batch_rows`). With padding, global batch k of epoch e is the examples
``order_e[k*B:(k+1)*B]`` and a process reads and tokenizes only those of its rows, so the processes' rows together
are exactly the one-process batch (pass ``width`` to agree on the row length: the longest over processes). With
packing, process ``s`` of ``S = batch_size / rows`` packs the examples ``order_e[s::S]`` into its rows.

**Epochs**: with padding and ``drop_last`` (training) an epoch's tail that cannot fill a batch is skipped; without
it the tail is padded with empty rows. Packing runs on across epoch boundaries (every process must yield a batch at
every step, and no example is lost at an epoch's end). With ``overflow="drop"`` or skipped bad records, padding
leaves the dropped example's row empty (all masks 0), so every process's rows stay those of the global batch;
packing moves on to the next example.

**Position**: ``loader.position`` is ``{"epoch": e, "index": i, "fingerprint": f, "counts": c}``: i examples of
epoch e's order are behind the next batch (for packing with several processes: this process's next example's place
in the order), f identifies the data (:func:`jlora.data.sources.fingerprint`), and c is ``Loader.counts`` up to
there. A Loader built with ``position=`` yields exactly the batches an uninterrupted one would have yielded next,
counts on from c, and refuses a position saved for other data.

Examples:
    >>> from jlora.data.records import Example
    >>> examples = [Example((1, 5), (6, 7, 2)), Example((1, 5, 5), (8, 2))]
    >>> loader = Loader(examples, batch_size=2, max_length=8, pad_id=0, bucket=4, shuffle=False)
    >>> batch = next(loader)
    >>> batch["input_ids"].tolist(), batch["loss_mask"].tolist()
    ([[1, 5, 6, 7, 2, 0, 0, 0], [1, 5, 5, 8, 2, 0, 0, 0]], [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]])
    >>> position = loader.position     # epoch 1 starts next; counts of what was read (truncated, skipped, ...)
    >>> position["epoch"], position["index"], position["counts"]["examples"]
    (1, 0, 2)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import numpy as np

from jlora.data import batching
from jlora.data.records import (_FORMATS, Example, bad_record, check_columns, check_policies,
                                context_turns_warning, fit, open_records, parse, tokenize_checked)
from jlora.data.sources import DataError, Source

_ENDLESS = sys.maxsize // 2


# ------------------------------------------------------------------------------------------------ the order


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which records this process reads, in which order, and how they form batches (see the module docstring).

    Examples:
        >>> plan = Plan(n=10, batch_size=4, rows=(2, 4), packing=False, drop_last=True)
        >>> plan.per_epoch, [plan.locate(q) for q in range(5)]   # rows 2-3 of batches 0 and 1, then epoch 1
        (4, [(0, 2), (0, 3), (0, 6), (0, 7), (1, 2)])
    """

    n: int
    batch_size: int
    rows: tuple[int, int]
    packing: bool
    drop_last: bool

    @property
    def local_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    @property
    def full_batches(self) -> int:
        return self.n // self.batch_size

    @property
    def tail(self) -> int:
        """Examples of this process in an epoch's last, partial batch (padding without drop_last)."""
        left = self.n - self.full_batches * self.batch_size
        if self.drop_last or not left:
            return 0
        return min(max(left - self.rows[0], 0), self.local_rows)

    @property
    def batches_per_epoch(self) -> int:
        """Padding: batches in every epoch, on every process."""
        partial = not self.drop_last and self.n % self.batch_size
        return self.full_batches + bool(partial)

    @property
    def shard(self) -> tuple[int, int]:
        """Packing: (this process's shard, number of shards)."""
        return self.rows[0] // self.local_rows, self.batch_size // self.local_rows

    @property
    def per_epoch(self) -> int:
        """Positions of this process's stream in each epoch."""
        if self.packing:
            s, count = self.shard
            return max(0, (self.n - s + count - 1) // count)
        return self.full_batches * self.local_rows + self.tail

    def locate(self, q: int) -> tuple[int, int]:
        """(epoch, index in that epoch's order) of stream position ``q``."""
        e, m = divmod(q, self.per_epoch)
        if self.packing:
            s, count = self.shard
            return e, s + m * count
        k, r = divmod(m, self.local_rows)
        return e, k * self.batch_size + self.rows[0] + r

    def batch(self, b: int) -> tuple[int, int]:
        """Padding: (first stream position, number of examples) of this process's part of batch ``b``."""
        e, k = divmod(b, self.batches_per_epoch)
        count = self.local_rows if k < self.full_batches else self.tail
        return e * self.per_epoch + k * self.local_rows, count

    def position_of(self, q: int, b: int) -> dict[str, int]:
        if self.packing:
            e, i = self.locate(q)
            return {"epoch": e, "index": i}
        e, k = divmod(b, self.batches_per_epoch)
        return {"epoch": e, "index": k * self.batch_size}

    def start(self, position: Mapping[str, int]) -> tuple[int, int]:
        """(stream position, batch number) of a position; raises when the position does not fit this plan."""
        e, i = int(position["epoch"]), int(position["index"])
        if e < 0 or not 0 <= i <= self.n:
            raise ValueError(f"`position` {dict(position)} is outside this dataset of {self.n} examples; was it "
                             f"saved for different data?")
        if self.packing:
            s, count = self.shard
            if (i - s) % count:
                raise ValueError(f"`position` index {i} is not one of this process's examples (shard {s} of "
                                 f"{count}); was it saved by another process or with another batch layout?")
            return e * self.per_epoch + (i - s) // count, 0
        if i % self.batch_size:
            raise ValueError(f"`position` index {i} is not at a batch boundary of batch_size={self.batch_size}; was "
                             f"it saved with another batch_size or with packing?")
        b = e * self.batches_per_epoch + min(i // self.batch_size, self.batches_per_epoch)
        return self.batch(b)[0], b


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` records in ``epoch``: a function of ``(seed, epoch)`` only, so every process and
    every resume computes the same one."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class _Order(grain.MapDataset):
    """Stream positions ``start, start+1, ...`` -> ``(q, record index)``."""

    def __init__(self, plan: Plan, seed: int, shuffle: bool, start: int, stop: int):
        super().__init__()
        self._plan, self._seed, self._shuffle, self._start, self._stop = plan, seed, shuffle, start, stop
        self._epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self._stop - self._start

    def _order(self, epoch: int) -> np.ndarray | None:
        if epoch != self._epoch:
            self._perm = epoch_order(self._plan.n, self._seed, epoch) if self._shuffle else None
            self._epoch = epoch
        return self._perm

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        q = self._start + k
        e, i = self._plan.locate(q)
        perm = self._order(e)
        return q, int(perm[i]) if perm is not None else i

    def __str__(self) -> str:
        return f"_Order(n={self._plan.n}, seed={self._seed})"


# ------------------------------------------------------------------------------------------------ tokenizing


class Item(NamedTuple):
    """One stream position after tokenizing: the example (None: dropped or skipped), what happened, and where it
    came from. ``notes``: "skipped" or "dropped"; or, for a kept example, any of "truncated", "boundary" (a token
    merge across the prompt/completion boundary) and "context_turns" (earlier assistant turns stayed context)."""

    q: int
    example: Example | None
    notes: tuple[str, ...]
    where: str
    message: str = ""   # a skipped record: what was wrong


class _Tokenize(grain.transforms.Map):
    """(q, record index) -> :class:`Item`: read, parse, validate, tokenize, apply the overflow policy."""

    def __init__(self, records, tokenizer, *, columns, max_length: int, overflow: str, on_bad_record: str,
                 check_boundaries: bool, chat_turns: str = "all"):
        self._records, self._tokenizer, self._columns = records, tokenizer, columns
        self._max_length, self._overflow, self._on_bad = max_length, overflow, on_bad_record
        self._check_boundaries, self._chat_turns = check_boundaries, chat_turns

    def map(self, element) -> Item:
        q, index = element
        if isinstance(self._records, Source):
            where, raw = self._records[index]
            try:
                record = parse(raw, where, self._columns)
                ex, matches, turns = tokenize_checked(record, self._tokenizer, source=where,
                                                      check_boundary=self._check_boundaries,
                                                      chat_turns=self._chat_turns)
            except ValueError as e:
                if self._on_bad == "error":
                    raise bad_record(e, where) from None
                return Item(q, None, ("skipped",), where, str(e))
            flags = ("boundary",) * (not matches) + ("context_turns",) * bool(turns)
        else:
            ex, flags = self._records[index], ()
            where = ex.source
        kept = fit(ex, self._max_length, self._overflow, where)
        notes = ("dropped",) if kept is None else flags if kept is ex else ("truncated", *flags)
        return Item(q, kept, notes, where)


# ------------------------------------------------------------------------------------------------ batching


class _Batches(grain.IterDataset):
    """Padded or packed batches of the tokenized stream; a Grain iterator whose state is the stream position."""

    def __init__(self, loader: Loader):
        super().__init__()
        self._loader = loader

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._loader)

    def __str__(self) -> str:
        return "_Batches(packing)" if self._loader.plan.packing else "_Batches(padding)"


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, loader: Loader):
        super().__init__()
        self._loader = loader
        self._items = None
        self._q = self._b = 0
        self._pending: Item | None = None
        self._fed = 0          # positions consumed without any example placed (all dropped: an error)

    # The state is where the next batch starts; set_state rebuilds the item pipeline from there.
    def get_state(self) -> dict[str, Any]:
        return {"q": self._q, "b": self._b}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.close_items()
        self._q, self._b, self._pending = int(state["q"]), int(state["b"]), None

    def close_items(self) -> None:
        if self._items is not None and hasattr(self._items, "close"):
            self._items.close()
        self._items = None

    def _next_item(self) -> Item:
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        if self._items is None:
            self._items = iter(self._loader.items(self._q))
        item = next(self._items)
        self._loader.note(item)
        return item

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self._loader.plan
        return self._pack(plan) if plan.packing else self._pad(plan)

    def _pad(self, plan: Plan) -> dict[str, np.ndarray]:
        loader = self._loader
        if loader.epochs is not None and self._b >= loader.epochs * plan.batches_per_epoch:
            raise StopIteration
        q, count = plan.batch(self._b)
        if q != self._q:            # an epoch's skipped tail (drop_last): restart the items there
            self.set_state({"q": q, "b": self._b})
        chosen = [self._next_item().example for _ in range(count)]
        kept = [ex for ex in chosen if ex is not None]
        # a batch that gave this process no rows (its rows lie past a short epoch's tail) is not "all dropped"
        self._fed = 0 if kept or not count else self._fed + 1
        if self._fed > plan.batches_per_epoch:
            raise DataError(loader.nothing_left())
        width = batching.round_up(max(map(len, kept), default=1), loader.bucket, loader.max_length)
        if loader.width is not None:
            width = loader.width(width)
        batch = batching.empty(plan.local_rows, width, loader.pad_id, False)
        for row, ex in enumerate(chosen):
            if ex is not None:
                batching.put(batch, row, 0, ex, None)
        self._q, self._b = q + count, self._b + 1
        return batch

    def _pack(self, plan: Plan) -> dict[str, np.ndarray]:
        loader = self._loader
        stop = _ENDLESS if loader.epochs is None else loader.epochs * plan.per_epoch
        batch = batching.empty(plan.local_rows, loader.max_length, loader.pad_id, True)
        row = col = segment = placed = 0
        q = self._q
        while q < stop:
            item = self._next_item()
            ex = item.example
            if ex is None:
                q += 1
                self._fed += 1
                if self._fed > plan.per_epoch:
                    raise DataError(loader.nothing_left())
                continue
            if col + len(ex) > loader.max_length:
                row, col, segment = row + 1, 0, 0
                if row == plan.local_rows:
                    self._pending = item
                    break
            segment += 1
            col = batching.put(batch, row, col, ex, segment)
            placed += 1
            self._fed = 0
            q += 1
        if q >= stop and (row, col) == (0, 0) or (q >= stop and loader.drop_last and row < plan.local_rows - 1):
            self._q = q
            loader.counts["examples"] -= placed      # the stream's last, partial batch is not yielded (drop_last)
            raise StopIteration
        self._q = q
        return batch


# ------------------------------------------------------------------------------------------------ the loader


def _examples_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.prompt_ids, np.int64).tobytes() + b"|" +
                 np.asarray(ex.completion_ids, np.int64).tobytes() + b"\n")
        if ex.prompt_mask:
            h.update(b"mask" + np.asarray(ex.prompt_mask, np.int8).tobytes())
    return h.hexdigest()[:16]


class Loader:
    """An iterator of batches in a seeded, resumable order (see the module docstring).

    Args:
        data: data files (a path, a folder of shards, a glob, or a list of them; :func:`jlora.data.open_source`), an
            opened :class:`~jlora.data.sources.Source`, or tokenized :class:`~jlora.data.records.Example` s.
        batch_size: rows of the global batch.
        max_length: the longest row (packing: every row's length).
        pad_id: the id written on padding (masked out everywhere; the tokenizer's pad or EOS id is usual).
        tokenizer: tokenizes records (needed for files; not for examples).
        columns: ``{jlora's field: your column}`` for data with other field names (``prompt``, ``completion``,
            ``messages``).
        overflow: an example longer than ``max_length``: "error" (names it), "truncate" or "drop" (warned, counted).
        on_bad_record: a malformed record: "error" (names file and line or row) or "skip" (warned, counted).
        seed: the shuffling seed; epoch e's order is a permutation drawn from ``(seed, e)``.
        shuffle: False keeps the records' order (evaluation).
        packing: pack several examples per row instead of padding one per row.
        bucket: padding rounds row lengths up to a multiple of this (None: always ``max_length``).
        drop_last: padding: skip an epoch's tail that cannot fill a batch (else pad it with empty rows); packing: drop
            the last, partial batch of a finite stream.
        epochs: stop after this many epochs (None: never stop).
        position: where to start, a :attr:`position` saved earlier (default: the beginning).
        rows: ``(start, stop)`` or a slice: the rows of the global batch this process builds (default: all).
        width: padding with several processes: maps this process's row length to the one all processes use (the
            maximum over processes, e.g. :func:`jlora.parallel.max_over_processes`).
        workers: tokenizing worker processes (0: in this process). They are started by spawning, which runs the
            main module again: a script that builds a Loader with workers must do so under
            ``if __name__ == "__main__":``, or the workers fail and the first batch never comes.
        check_boundaries: warn when prompt and completion tokenized apart differ from the joined text's ids.
        chat_turns: "all" (default) trains every assistant turn of a chat, "last" only the last one.
    """

    def __init__(self, data: Any, *, batch_size: int, max_length: int, pad_id: int, tokenizer=None,
                 columns: Mapping[str, str] | None = None, overflow: str = "error", on_bad_record: str = "error",
                 seed: int = 0, shuffle: bool = True, packing: bool = False, bucket: int | None = 16,
                 drop_last: bool = True, epochs: int | None = None, position: Mapping[str, Any] | None = None,
                 rows: tuple[int, int] | slice | None = None, width: Callable[[int], int] | None = None,
                 workers: int = 0, check_boundaries: bool = True, chat_turns: str = "all"):
        check_policies(max_length=max_length, overflow=overflow, on_bad_record=on_bad_record, chat_turns=chat_turns)
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1; got {batch_size}")
        if workers < 0:
            raise ValueError(f"`workers` must be >= 0; got {workers}")
        self.columns = check_columns(columns)
        if not isinstance(data, (Source, str, os.PathLike)):
            data = list(data)  # a generator is read once: what _is_examples looks at must stay in the data
        if isinstance(data, Source) or not _is_examples(data):
            source = open_records(data, self.columns)
            if tokenizer is None:
                raise ValueError("reading data files needs a `tokenizer`")
            self.records, self.fingerprint = source, source.fingerprint()
        else:
            examples = list(data)
            if not examples:
                raise ValueError(f"the dataset is empty; a Loader needs at least one example, {_FORMATS}")
            longest = max(examples, key=len)
            if len(longest) > max_length:
                raise ValueError(f"{longest.source or 'an example'} has {len(longest)} tokens, more than "
                                 f"max_length={max_length}; tokenize with the same max_length (tokenize_all applies "
                                 f"the overflow policy)")
            self.records, self.fingerprint = examples, _examples_fingerprint(examples)
        n = len(self.records)
        rows = (rows.start, rows.stop) if isinstance(rows, slice) else tuple(rows or (0, batch_size))
        if not 0 <= rows[0] < rows[1] <= batch_size or (packing and (batch_size % (rows[1] - rows[0]) or
                                                                      rows[0] % (rows[1] - rows[0]))):
            raise ValueError(f"`rows` {rows} must be a slice of the {batch_size} rows of the global batch (with "
                             f"packing: one of equal parts), as jlora.parallel.local_batch_rows gives")
        self.plan = Plan(n, batch_size, rows, packing, drop_last)
        if not packing and drop_last and n < batch_size:
            raise ValueError(f"the data set has {n} examples, fewer than batch_size={batch_size}, so with drop_last "
                             f"no batch can be formed; lower `batch_size` or add data")
        if packing and not self.plan.per_epoch:
            raise ValueError(f"the data set has {n} examples, fewer than the {self.plan.shard[1]} packing shards")
        self.tokenizer, self.max_length, self.pad_id = tokenizer, max_length, int(pad_id)
        self.overflow, self.on_bad_record, self.check_boundaries = overflow, on_bad_record, check_boundaries
        self.chat_turns = chat_turns
        self.seed, self.shuffle, self.bucket, self.drop_last = seed, shuffle, bucket, drop_last
        self.epochs, self.width, self.workers = epochs, width, workers
        self.counts = {"examples": 0, "truncated": 0, "dropped": 0, "skipped": 0, "boundary": 0, "context_turns": 0}
        self._first: dict[str, str] = {}
        self._iter = _Batches(self).__iter__()
        if position is not None:
            self._iter.set_state(self._state_of(position))
            self.counts.update(position.get("counts") or {})   # a resumed run counts on from where it was

    # ---- the pipeline
    def items(self, start: int) -> grain.IterDataset:
        """The tokenized stream from position ``start``: ``_Order`` -> ``_Tokenize`` (in ``workers`` processes)."""
        plan = self.plan
        stop = _ENDLESS if self.epochs is None else self.epochs * plan.per_epoch
        ds = _Order(plan, self.seed, self.shuffle, start, max(start, stop)).map(
            _Tokenize(self.records, self.tokenizer, columns=self.columns, max_length=self.max_length,
                      overflow=self.overflow, on_bad_record=self.on_bad_record,
                      check_boundaries=self.check_boundaries, chat_turns=self.chat_turns))
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if self.workers:
            _absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=16),
                                worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
        return it

    def note(self, item: Item) -> None:
        """Counts what happened to an example; warns at the first of each kind."""
        if item.example is not None:
            self.counts["examples"] += 1
        for note in item.notes:
            self.counts[note] += 1
            if note in self._first:
                continue
            self._first[note] = item.where
            what = {"skipped": f"skipped a malformed record (on_bad_record='skip'): {item.message}",
                    "boundary": f"{item.where}: prompt and completion tokenize differently apart than joined (a token "
                                f"merges across the boundary); training uses the separate tokenizations, as "
                                f"generation sees them",
                    "context_turns": context_turns_warning(item.where),
                    "truncated": f"{item.where}: example longer than max_length={self.max_length} truncated",
                    "dropped": f"{item.where}: example longer than max_length={self.max_length} dropped"}[note]
            warnings.warn(f"{what}; further ones are counted, not warned (Loader.counts)", stacklevel=4)

    def summary(self) -> str:
        """One line: the examples read and what was truncated, dropped or skipped (empty when nothing was)."""
        c = self.counts
        parts = [f"{c[k]} {k}" for k in ("truncated", "dropped", "skipped") if c[k]]
        if c["boundary"]:
            parts.append(f"{c['boundary']} with a token merge across the prompt/completion boundary")
        if c["context_turns"]:
            parts.append(f"{c['context_turns']} chats with earlier assistant turns left as context")
        return f"data: of {c['examples'] + c['dropped'] + c['skipped']} records read, " + ", ".join(parts) \
            if parts else ""

    def nothing_left(self) -> str:
        return (f"a whole epoch of {len(self.records)} records gave no example: every one was dropped "
                f"(max_length={self.max_length}, overflow={self.overflow!r}) or skipped as malformed")

    def check_not_empty(self) -> None:
        """Raises :class:`DataError` when no record gives an example (every one dropped by the overflow policy or
        skipped as malformed), which would otherwise train on empty batches. Tokenizes records in file order, in
        this process, only until the first one that gives an example: one record on usual data."""
        tokenize = _Tokenize(self.records, self.tokenizer, columns=self.columns, max_length=self.max_length,
                             overflow=self.overflow, on_bad_record=self.on_bad_record, check_boundaries=False,
                             chat_turns=self.chat_turns)
        notes = {"dropped": 0, "skipped": 0}
        for index in range(len(self.records)):
            item = tokenize.map((index, index))
            if item.example is not None:
                return
            notes[item.notes[0]] += 1
        why = []
        if notes["dropped"]:
            why.append(f"{notes['dropped']} longer than max_length={self.max_length} dropped (overflow='drop'); raise "
                       f"`max_length` or choose overflow='truncate'")
        if notes["skipped"]:
            why.append(f"{notes['skipped']} malformed and skipped (on_bad_record='skip'); fix them (on_bad_record="
                       f"'error' stops at the first and names its problem)")
        raise DataError(f"no example is left to train on: of the {len(self.records)} records, " + "; ".join(why))

    # ---- iteration and position
    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def __len__(self) -> int:
        """Records in the data (all processes' together)."""
        return len(self.records)

    def _state_of(self, position: Mapping[str, Any]) -> dict[str, int]:
        if not isinstance(position, Mapping) or not {"epoch", "index"} <= set(position):
            raise ValueError(f"`position` must be a dict with keys 'epoch' and 'index' (a Loader's `position`); got "
                             f"{position!r}")
        saved = position.get("fingerprint")
        if saved is not None and saved != self.fingerprint:
            raise DataError(f"the data changed since this position was saved: its fingerprint is {saved}, the data's "
                            f"now is {self.fingerprint} ({self.describe()}); resume with the same data files, or "
                            f"start a new run")
        q, b = self.plan.start(position)
        return {"q": q, "b": b}

    @property
    def position(self) -> dict[str, Any]:
        """Where the next batch starts (JSON-able; pass it back as ``position``)."""
        state = self._iter.get_state()
        counts = dict(self.counts)
        pending = self._iter._pending      # read and counted, but the next batch starts with it: not yet
        if pending is not None:
            counts["examples"] -= pending.example is not None
            for note in pending.notes:
                counts[note] -= 1
        return {**self.plan.position_of(state["q"], state["b"]), "fingerprint": self.fingerprint, "counts": counts}

    def describe(self) -> str:
        if isinstance(self.records, Source):
            return f"{self.records.name}: {len(self.records.files)} file(s), {len(self.records)} records"
        return f"{len(self.records)} examples in memory"

    def order(self, epoch: int) -> np.ndarray:
        """The record indices of ``epoch``, in the order they are read (all processes' together)."""
        return epoch_order(self.plan.n, self.seed, epoch) if self.shuffle else np.arange(self.plan.n)

    def close(self) -> None:
        """Stops worker processes (also done when the Loader is garbage collected)."""
        self._iter.close_items()

    def __del__(self):
        try:
            self.close()
        except Exception:   # interpreter shutdown
            pass


def _exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
    """In a worker process: exit as soon as the process that started it is gone (a SIGKILLed run must not leave its
    workers behind)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="jlora-exit-with-parent").start()


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags, which a program that never ran ``absl.app`` has not parsed: take
    their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _is_examples(data: Any) -> bool:
    """Whether ``data`` (a path, paths, or a list already materialized) holds examples, not file paths."""
    if isinstance(data, (str, os.PathLike)):
        return False
    return not data or isinstance(data[0], Example)


__all__ = ["Loader", "Plan", "Item", "epoch_order"]
