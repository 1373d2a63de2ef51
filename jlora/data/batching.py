"""Batch arrays: rows of examples, right padded (``input_ids``, ``attention_mask``, ``loss_mask``; packed rows also
``positions`` and ``segment_ids``), and batches stacked for :func:`jlora.scan_steps`.

Examples:
    >>> from jlora.data.records import Example
    >>> batch = empty(1, 8, pad_id=0, packing=True)
    >>> put(batch, 0, 0, Example((1, 5), (6, 2)), 1), put(batch, 0, 4, Example((1,), (7, 2)), 2)
    (4, 7)
    >>> batch["loss_mask"][0].tolist(), batch["segment_ids"][0].tolist()
    ([0, 0, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 2, 2, 2, 0])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def round_up(n: int, multiple: int | None, cap: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at least one), capped at ``cap``; ``cap`` when no multiple.

    Examples:
        >>> round_up(85, 16, 128), round_up(3, 16, 128), round_up(120, 16, 128), round_up(5, None, 64)
        (96, 16, 128, 64)
    """
    return cap if not multiple else min(cap, max(multiple, math.ceil(n / multiple) * multiple))


def empty(batch_size: int, length: int, pad_id: int, packing: bool) -> dict[str, np.ndarray]:
    """A batch of empty rows: ``pad_id`` everywhere, all masks 0."""
    b = {"input_ids": np.full((batch_size, length), pad_id, np.int32),
         "attention_mask": np.zeros((batch_size, length), np.int32),
         "loss_mask": np.zeros((batch_size, length), np.int32)}
    if packing:
        b["positions"] = np.zeros((batch_size, length), np.int32)
        b["segment_ids"] = np.zeros((batch_size, length), np.int32)
    return b


def put(batch, row: int, start: int, ex, segment: int | None) -> int:
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


def pad_to(batch: Mapping[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """Right-pads every row to ``width`` columns (masks, positions and segments 0; ids 0 too: masked out).

    Examples:
        >>> pad_to({"input_ids": np.ones((1, 2), np.int32)}, 4)["input_ids"].tolist()
        [[1, 1, 0, 0]]
    """
    return {k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for k, v in batch.items()}


def stack_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches of one batch size stacked on a new leading axis (for :func:`jlora.scan_steps`), each right-padded
    to the widest: padding columns get mask 0 (and id, position and segment 0), so every batch's loss and
    gradients are those it has alone.

    Examples:
        >>> a = {"input_ids": np.ones((2, 3), np.int32), "attention_mask": np.ones((2, 3), np.int32)}
        >>> b = {"input_ids": np.ones((2, 5), np.int32), "attention_mask": np.ones((2, 5), np.int32)}
        >>> s = stack_batches([a, b])
        >>> s["input_ids"].shape, s["attention_mask"][0].tolist()
        ((2, 2, 5), [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    """
    width = max(b["input_ids"].shape[1] for b in batches)
    return {k: np.stack([pad_to(b, width)[k] for b in batches]) for k in batches[0]}
