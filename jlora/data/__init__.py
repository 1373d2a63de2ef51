"""Training data: records in data files -> tokenized, loss-masked examples -> padded or packed batches, streamed
through a Grain pipeline; eval prompts.

* :mod:`jlora.data.sources`: JSONL, Parquet, Arrow (``datasets``' ``save_to_disk`` shards) and ArrayRecord files,
  folders of shards and globs, read record by record (:func:`open_source`), and a fingerprint of the data;
* :mod:`jlora.data.records`: the two record formats (prompt/completion pairs, chats), the ``columns`` mapping,
  tokenization with loss masks, the ``overflow`` policy, eval prompts; :func:`load` for small data in memory;
* :mod:`jlora.data.loader`: :class:`Loader`, the Grain pipeline (seeded order, tokenizing transform in worker
  processes, padding with length buckets or packing with ``segment_ids``), per-process shards and exact resume;
* :mod:`jlora.data.batching`: the batch arrays, :func:`stack_batches`.

Examples:
    >>> examples = [Example((1, 5), (6, 7, 2)), Example((1, 5, 5), (8, 2))]
    >>> batch = next(Loader(examples, batch_size=2, max_length=8, pad_id=0, bucket=4, shuffle=False))
    >>> batch["input_ids"].shape
    (2, 8)
"""

from jlora.data.batching import pad_to, stack_batches
from jlora.data.loader import Loader
from jlora.data.records import (BAD_RECORD_POLICIES, CHAT_TURNS, OVERFLOW_POLICIES, EvalPrompt, Example, eval_prompts,
                                fit, format_chat, length_stats, load, load_splits, parse, read, read_jsonl, split,
                                split_chat, tokenize, tokenize_all, validate_record)
from jlora.data.sources import DataError, Source, fingerprint, open_source

__all__ = ["Loader", "Example", "EvalPrompt", "Source", "DataError", "OVERFLOW_POLICIES", "BAD_RECORD_POLICIES",
           "CHAT_TURNS", "open_source", "fingerprint", "read", "read_jsonl", "parse", "validate_record", "split",
           "format_chat", "split_chat", "tokenize", "tokenize_all", "fit", "load", "load_splits", "length_stats",
           "stack_batches", "pad_to", "eval_prompts"]
