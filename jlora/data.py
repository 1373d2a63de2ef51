"""Training data: JSONL records -> tokenized examples -> padded or packed, loss-masked batches; eval prompts.

Records are JSON objects, one per line, in either of two formats (a file may mix them):

* ``{"prompt": "...", "completion": "..."}``: raw text. The prompt gets the tokenizer's BOS (when it adds
  one); the completion gets the EOS token appended, so the model learns to stop.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat whose last turn is the assistant's. The
  prompt is the chat template applied to all turns but the last, with ``add_generation_prompt=True`` (exactly
  what generation sees); the completion is the rest of the fully rendered chat: the assistant text and the
  template's end-of-turn token(s), cut after the last end-of-turn id (ChatML's trailing newline after
  ``<|im_end|>`` is not trained). Only the last assistant turn is a target; earlier turns are context.

Prompt and completion are tokenized separately and concatenated, so training sees the same prompt ids as
generation. `tokenize_all` checks that the concatenation equals the tokenization of the joined text and warns
(once, with a count) where a tokenizer merges across the boundary.

The loss mask is 1 on completion tokens only (``loss_mask[:, t]`` says token t is a target, as
`jlora.causal_lm_loss` reads it). An example longer than ``max_length`` is an error by default (silently
cutting the answer off would teach the model to stop mid-JSON); ``overflow="truncate"`` keeps the first
``max_length`` tokens and ``overflow="drop"`` skips the example, each with one warning giving the count.

Batches are dicts of numpy int32 arrays of shape (batch_size, length):

* padding (default): one example per row, right padded with ``pad_id``; the row length is the batch's
  longest example rounded up to a multiple of ``bucket`` (capped at ``max_length``), so jit sees few shapes.
  Keys: ``input_ids``, ``attention_mask``, ``loss_mask``. The default bucket, 16, gives the demo data one shape
  (rows of 112); a coarser bucket means fewer compilations for data of widely varying lengths.
* packing: examples are laid greedily, in order, into rows of exactly ``max_length`` (an example that does not
  fit the rest of a row starts the next one); each row also carries ``positions`` (restarting at 0 for every
  example) and ``segment_ids`` (1, 2, ... per example in its row, 0 on padding). `jlora.lm_loss` passes both to the
  model, and jlora's models attend only within a segment, at the per-example positions: a packed example computes
  exactly what it computes alone. Its first token is never a target (nothing of its own precedes it), so no loss
  crosses from one example into the next. A model of your own packs exactly only if it honours ``segment_ids``
  and ``positions``; otherwise an example attends to the earlier examples of its row.

Order: each epoch is a seeded permutation (``numpy.random.default_rng([seed, epoch])``). A `Loader`'s
``position`` is ``{"epoch": e, "index": i}``, i = examples of epoch e's order already consumed; a Loader built
with that position yields exactly the batches an uninterrupted one would have yielded next. With ``drop_last``
(training) an epoch's tail that cannot fill a batch is skipped; otherwise it is padded with empty rows
(all-zero masks) so every batch has ``batch_size`` rows.

Generation-based evaluation decodes from `eval_prompts`: each record's prompt (as training formats it) and its
reference text. Scoring a completion against the reference is the task's business, not this module's (a run
names its scorer in ``eval.scorer``: :mod:`jlora.cli.scoring`).

Examples:
    >>> examples = [Example((1, 5), (6, 7, 2)), Example((1, 5, 5), (8, 2))]
    >>> loader = Loader(examples, batch_size=2, max_length=8, pad_id=0, bucket=4, shuffle=False)
    >>> batch = next(loader)
    >>> batch["input_ids"].tolist(), batch["loss_mask"].tolist()
    ([[1, 5, 6, 7, 2, 0, 0, 0], [1, 5, 5, 8, 2, 0, 0, 0]], [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]])
    >>> loader.position
    {'epoch': 0, 'index': 2}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

OVERFLOW_POLICIES = ("error", "truncate", "drop")
_FORMATS = "a chat {'messages': [{'role': ..., 'content': ...}, ...]} or a pair {'prompt': ..., 'completion': ...}"


# ---------------------------------------------------------------------------------------------------- reading


def _read(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(source "file:line", record) for every non-blank line; validates each record's format."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} not found (cwd {os.getcwd()!r}); check the path in `data.train`"
                                f"/`data.valid`")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line.rstrip("\r\n"))   # the error column of a cut-short line: its end
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); each line must be one "
                                 f"JSON object") from None
            validate_record(record, where)
            out.append((where, record))
    if not out:
        raise ValueError(f"data file {path!r} holds no records; expected one JSON object per line, {_FORMATS}")
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file, each validated (`validate_record`); blank lines are skipped.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: ``file:line`` of a malformed line or a record of neither format; an empty file.
    """
    return [r for _, r in _read(path)]


def validate_record(record: Any, where: str = "record") -> str:
    """Returns the record's format, ``"chat"`` or ``"pair"``; raises a ValueError naming what is wrong."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, {_FORMATS}; got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'; "
                                 f"got {m!r}")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message is the training target and must have role 'assistant'; "
                             f"got role {msgs[-1]['role']!r}")
        return "chat"
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; expected {_FORMATS}; got keys {sorted(record)}")
    for k in ("prompt", "completion"):
        if not isinstance(record[k], str):
            raise ValueError(f"{where}: {k!r} must be a string; got {type(record[k]).__name__}")
    return "pair"


def split(items: Sequence[Any], *, valid_fraction: float = 0.0, valid_count: int = 0,
          seed: int = 0) -> tuple[list[Any], list[Any]]:
    """A seeded (train, valid) split; ``valid_count`` wins over ``valid_fraction`` (rounded, at least 1 when > 0).

    Both keep the items' original order; together they are a partition of ``items``.

    Examples:
        >>> split(list(range(10)), valid_count=3, seed=1)
        ([0, 1, 2, 3, 5, 8, 9], [4, 6, 7])
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"`valid_fraction` must be in [0, 1); got {valid_fraction}")
    n = len(items)
    k = valid_count or (max(1, round(n * valid_fraction)) if valid_fraction > 0 else 0)
    if not 0 <= k < n:
        raise ValueError(f"cannot hold out {k} validation examples from {n}; leave at least one for training")
    chosen = set(np.random.default_rng([seed, 0x5EED]).permutation(n)[:k].tolist())
    return ([x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen])


# ---------------------------------------------------------------------------------------------------- tokenizing


@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenized example: ``prompt_ids`` (context, not trained) then ``completion_ids`` (targets)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.completion_ids

    @property
    def loss_mask(self) -> tuple[int, ...]:
        return (0,) * len(self.prompt_ids) + (1,) * len(self.completion_ids)


def format_chat(messages: Sequence[Mapping[str, str]], tokenizer) -> tuple[str, str]:
    """(prompt_text, completion_text) of a chat whose last turn is the assistant's (see the module docstring)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation without its last turn (plus the generation "
                         "prompt) differently from the start of the whole conversation, so the assistant turn "
                         f"cannot be split off;\n prompt: {prompt!r}\n full:   {full!r}\nuse prompt/completion "
                         "records instead")
    return prompt, full[len(prompt):]


def _end_ids(tokenizer) -> tuple[int, ...]:
    ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    eos = tokenizer.eos_token_id
    return ids or (() if eos is None else (eos,))


def _pair_prompt_ids(prompt: str, tokenizer) -> list[int]:
    """A raw prompt's ids: BOS when the tokenizer adds one, then the text (never an EOS)."""
    bos = tokenizer.bos_token_id
    add_bos = bool(getattr(tokenizer, "add_bos_token", False)) and bos is not None
    return [bos] * add_bos + tokenizer.encode(prompt, add_special_tokens=False)


def tokenize(record: Mapping[str, Any], tokenizer, *, source: str = "") -> Example:
    """One record (either format) as an `Example`; see the module docstring for the formatting rules."""
    fmt = validate_record(record, source or "record")
    end = _end_ids(tokenizer)
    if fmt == "chat":
        prompt_text, completion_text = format_chat(record["messages"], tokenizer)
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
        completion = tokenizer.encode(completion_text, add_special_tokens=False)
        cut = max((i for i, t in enumerate(completion) if t in end), default=None)
        completion = completion[:cut + 1] if cut is not None else completion + list(end[:1])
    else:
        prompt = _pair_prompt_ids(record["prompt"], tokenizer)
        completion = tokenizer.encode(record["completion"], add_special_tokens=False) + list(end[:1])
    if not completion:
        raise ValueError(f"{source or 'record'}: the completion is empty, so there is nothing to train on")
    return Example(tuple(prompt), tuple(completion), source)


def _joined_tokenization_matches(record: Mapping[str, Any], tokenizer) -> bool:
    """Whether prompt and completion tokenized apart give the joined text's ids (a merge across the boundary
    would make them differ)."""
    if "messages" in record:
        prompt, completion = format_chat(record["messages"], tokenizer)
    else:
        prompt, completion = record["prompt"], record["completion"]
    apart = tokenizer.encode(prompt, add_special_tokens=False) + tokenizer.encode(completion, add_special_tokens=False)
    return apart == tokenizer.encode(prompt + completion, add_special_tokens=False)


def tokenize_all(records: Sequence[Mapping[str, Any]], tokenizer, *, max_length: int, overflow: str = "error",
                 sources: Sequence[str] | None = None, check_boundaries: bool = True) -> list[Example]:
    """Tokenizes records and applies the ``overflow`` policy for examples longer than ``max_length``.

    Args:
        records: validated records (either format).
        tokenizer: a `jlora.hf.tokenizer.Tokenizer` (or anything with its ``encode``/``apply_chat_template``/
            ``bos_token_id``/``eos_token_id``/``eos_token_ids``).
        max_length: the longest example, in tokens.
        overflow: "error" (default), "truncate" (keep the first ``max_length`` tokens; an example whose prompt
            alone fills them is dropped) or "drop".
        sources: a "file:line" per record, for messages.
        check_boundaries: warn when prompt and completion tokenized apart differ from the joined text's ids.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"`overflow` must be one of {OVERFLOW_POLICIES}; got {overflow!r}")
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2; got {max_length}")
    if not records:
        raise ValueError(f"no records to tokenize; expected at least one, {_FORMATS}")
    sources = sources or [f"record {i}" for i in range(len(records))]
    out, changed, mismatched = [], [], []
    for record, where in zip(records, sources):
        ex = tokenize(record, tokenizer, source=where)
        if check_boundaries and not _joined_tokenization_matches(record, tokenizer):
            mismatched.append(where)
        if len(ex) > max_length:
            if overflow == "error":
                raise ValueError(f"{where}: example has {len(ex)} tokens (prompt {len(ex.prompt_ids)} + completion "
                                 f"{len(ex.completion_ids)}) but max_length is {max_length}; raise `max_length`, "
                                 f"shorten the example, or choose overflow='truncate' or 'drop'")
            changed.append(where)
            if overflow == "drop" or len(ex.prompt_ids) >= max_length:
                continue
            ex = Example(ex.prompt_ids, ex.completion_ids[:max_length - len(ex.prompt_ids)], where)
        out.append(ex)
    if changed:
        warnings.warn(f"{len(changed)} of {len(records)} examples exceed max_length={max_length} and were "
                      f"{'dropped' if overflow == 'drop' else 'truncated (or dropped if the prompt alone fills it)'}; "
                      f"first: {changed[0]}", stacklevel=2)
    if mismatched:
        warnings.warn(f"{len(mismatched)} of {len(records)} examples tokenize differently when prompt and completion "
                      f"are joined (a token merges across the boundary); training uses the separate tokenizations, "
                      f"as generation sees them; first: {mismatched[0]}", stacklevel=2)
    if not out:
        raise ValueError(f"all {len(records)} examples were dropped for exceeding max_length={max_length}")
    return out


def load(path: str | os.PathLike, tokenizer, *, max_length: int, overflow: str = "error") -> list[Example]:
    """`read_jsonl` + `tokenize_all`, with ``file:line`` sources in every message."""
    pairs = _read(path)
    return tokenize_all([r for _, r in pairs], tokenizer, max_length=max_length, overflow=overflow,
                        sources=[w for w, _ in pairs])


def load_splits(train: str | os.PathLike, tokenizer, *, valid: str | os.PathLike | None = None,
                valid_fraction: float = 0.0, max_length: int, overflow: str = "error",
                seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Train and validation examples: from ``valid`` when given, else a seeded ``valid_fraction`` of ``train``
    (an empty list when neither)."""
    pairs = _read(train)
    if valid:
        vpairs = _read(valid)
    elif valid_fraction > 0:
        pairs, vpairs = split(pairs, valid_fraction=valid_fraction, seed=seed)
    else:
        vpairs = []

    def tok(ps):
        return tokenize_all([r for _, r in ps], tokenizer, max_length=max_length, overflow=overflow,
                            sources=[w for w, _ in ps]) if ps else []

    return tok(pairs), tok(vpairs)


def length_stats(examples: Sequence[Example]) -> dict[str, float]:
    """Token-length distribution: min, mean, p50, p90, max, and the mean completion length."""
    lengths = np.array([len(e) for e in examples])
    return {"n": len(examples), "min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
            "p50": int(np.percentile(lengths, 50)), "p90": int(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
            "completion_mean": round(float(np.mean([len(e.completion_ids) for e in examples])), 1)}


# ---------------------------------------------------------------------------------------------------- batching


def _round_up(n: int, multiple: int | None, cap: int) -> int:
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
    return {k: np.stack([np.pad(b[k], ((0, 0), (0, width - b[k].shape[1]))) for b in batches])
            for k in batches[0]}


# ---------------------------------------------------------------------------------------------------- evaluation


class EvalPrompt(NamedTuple):
    """A generation-based eval item: the prompt (text and ids) and the reference answer."""

    prompt_text: str
    prompt_ids: list[int]
    target: str                  # the reference completion text (the last assistant turn, or `completion`)
    source: str


def eval_prompts(data: str | os.PathLike | Sequence[Mapping[str, Any]], tokenizer, *,
                 limit: int | None = None) -> list[EvalPrompt]:
    """Prompts to decode from and their references, from a JSONL path or a list of records (first ``limit``)."""
    pairs = (_read(data) if isinstance(data, (str, os.PathLike))
             else [(f"record {i}", r) for i, r in enumerate(data)])
    out = []
    for where, record in pairs[:limit]:
        if validate_record(record, where) == "chat":
            text = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True)
            target = record["messages"][-1]["content"]
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            text, target = record["prompt"], record["completion"]
            ids = _pair_prompt_ids(text, tokenizer)
        out.append(EvalPrompt(text, ids, target, where))
    return out

