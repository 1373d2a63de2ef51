"""Records: parsing (with a column mapping), validation, tokenization with loss masks and the overflow policy.

Records are objects in either of two formats (a data set may mix them):

* ``{"prompt": "...", "completion": "..."}``: raw text. The prompt gets the tokenizer's BOS (when it adds
  one); the completion gets the EOS token appended, so the model learns to stop.
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat whose last turn is the assistant's. The
  prompt is the chat template applied to all turns but the last, with ``add_generation_prompt=True`` (exactly
  what generation sees); the completion is the rest of the fully rendered chat: the assistant text and the
  template's end-of-turn token(s), cut after the last end-of-turn id (ChatML's trailing newline after
  ``<|im_end|>`` is not trained). Earlier assistant turns are targets too (``chat_turns="all"``, the default; as
  TRL's assistant-only loss), each with its end-of-turn token: the spans the template marks as ``generation``
  blocks, or else each turn split off the same way as the last (see :func:`split_chat`); a turn the template
  renders differently inside the whole chat (one that moves the system prompt into the last user turn, or strips
  earlier turns' reasoning) stays context, with a warning. The prompt, earlier turns included, is encoded once,
  as generation sees it. ``chat_turns="last"`` trains the last turn only. A chat may carry ``tools`` (a list of
  JSON schemas, or its JSON text), handed to the template as transformers hands it; an assistant turn with
  ``tool_calls`` may have no ``content``.

Data whose fields have other names maps them with ``columns``, ``{jlora's name: the data's name}``, e.g.
``{"prompt": "question", "completion": "answer"}`` or ``{"messages": "conversations"}``.

Prompt and completion are tokenized separately and concatenated, so training sees the same prompt ids as
generation. Where the concatenation differs from the tokenization of the joined text (a tokenizer merging across
the boundary) a warning says so (once, with a count).

The loss mask is 1 on completion tokens only (``loss_mask[:, t]`` says token t is a target, as
`jlora.causal_lm_loss` reads it). An example longer than ``max_length`` is an error by default (silently
cutting the answer off would teach the model to stop mid-JSON); ``overflow="truncate"`` keeps the first
``max_length`` tokens and ``overflow="drop"`` skips the example, each with a warning giving the count.

Examples:
    >>> parse(b'{"q": "2+2=", "a": "4"}', "f.jsonl:3", columns={"prompt": "q", "completion": "a"})
    {'prompt': '2+2=', 'completion': '4'}
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jlora.data.sources import DataError, Source, held_out_mask, open_source

OVERFLOW_POLICIES = ("error", "truncate", "drop")
BAD_RECORD_POLICIES = ("error", "skip")
FIELDS = ("prompt", "completion", "messages", "tools")
CHAT_TURNS = ("all", "last")
# The chat roles of the common templates (ChatML, Llama 3, Qwen, Mistral, OpenAI's messages). Another role passes
# through to the template, which may have its own; one that only differs from these by a typo or by case is refused.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
_FORMATS = "a chat {'messages': [{'role': ..., 'content': ...}, ...]} or a pair {'prompt': ..., 'completion': ...}"


# ---------------------------------------------------------------------------------------------------- parsing


def check_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """A column mapping checked: keys among ``prompt``, ``completion``, ``messages``, ``tools``; values strings.

    Examples:
        >>> check_columns({"prompt": "question"})
        {'prompt': 'question'}
    """
    columns = dict(columns or {})
    bad = [k for k in columns if k not in FIELDS]
    if bad:
        raise ValueError(f"`columns` maps jlora's record fields {list(FIELDS)} to your data's names; got unknown "
                         f"field(s) {bad}")
    if not all(isinstance(v, str) and v for v in columns.values()):
        raise ValueError(f"`columns` values must be column names (strings); got {columns}")
    return columns


def needed_columns(columns: Mapping[str, str] | None) -> tuple[str, ...]:
    """The data's column names a record may use (the fields after the mapping)."""
    columns = dict(columns or {})
    return tuple(columns.get(f, f) for f in FIELDS)


def check_schema(source: Source, columns: Mapping[str, str] | None = None) -> None:
    """For Parquet and Arrow files: every file has the columns of one record format (a missing column is an error
    naming the file, the columns it has and the mapping to fix it)."""
    columns = dict(columns or {})
    prompt, completion, messages = needed_columns(columns)[:3]
    for f in source.files:
        names = getattr(f, "schema_names", None)
        if names is None or messages in names or (prompt in names and completion in names):
            continue
        lacking = [c for c in (prompt, completion) if c not in names]
        spare = iter([n for n in names if n not in (prompt, completion)] + list(names))   # for the example
        example = {field: (c if c in names else next(spare)) for field, c in (("prompt", prompt),
                                                                               ("completion", completion))}
        raise DataError(f"{f.path}: missing column(s) {lacking} (or {messages!r} for chats); the file has columns "
                        f"{list(names)}; map your names with `columns` (data.columns in a run config), e.g. "
                        f"{example}")


def parse(raw: Any, where: str, columns: Mapping[str, str] | None = None) -> dict:
    """A stored record (a JSON line's or an ArrayRecord's bytes, a Parquet/Arrow row) as a dict of jlora's fields.

    Raises:
        DataError: ``where`` and what is wrong: malformed JSON, not an object, or a column that ``columns`` maps
            missing from a record that is neither format without it (named with the record's keys).
    """
    lines = ""
    if isinstance(raw, (bytes, bytearray, memoryview, str)):
        lines = " (a JSON Lines file, .jsonl or .json, holds one such object per line, not a JSON array)"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            what = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
            raise DataError(f"{where}: malformed JSON ({what}); each record must be one JSON object{lines}") from None
    else:
        record = raw
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, {_FORMATS}; got {type(record).__name__}{lines}")
    renamed = {theirs: ours for ours, theirs in (columns or {}).items()}
    out = {}
    for k, v in record.items():
        if k in renamed:
            out[renamed[k]] = v
        elif k not in (columns or {}):     # a field name mapped from another column is not read from its own
            out.setdefault(k, v)
    # Parquet/Arrow rows of mixed formats hold nulls in the other format's columns.
    out = {k: v for k, v in out.items() if not (v is None and k in FIELDS)}
    if columns and "messages" not in out and not ("prompt" in out and "completion" in out):
        _check_mapped(record, where, columns)
    return out


class _MappingError(DataError):
    """A record that lacks a column the ``columns`` mapping names."""


def _check_mapped(record: Mapping[str, Any], where: str, columns: Mapping[str, str]) -> None:
    """For a record that is neither format after the mapping: a :class:`DataError` when the mapping names a column
    the record lacks, naming the mapping, that column and the record's own keys (a plain "missing key" would name
    jlora's field, which the record may well hold under its own name: it is not read while ``columns`` maps it).

    Examples:
        >>> _check_mapped({"messages": []}, "d.jsonl:1", {"messages": "conversation"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jlora.data.records._MappingError: d.jsonl:1: `columns` (data.columns in a run config) maps 'messages' to ...
    """
    lost = {ours: theirs for ours, theirs in columns.items() if ours != "tools" and theirs not in record}
    if not lost:
        return
    maps = " and ".join(f"{ours!r} to the column {theirs!r}" for ours, theirs in lost.items())
    own = [ours for ours in lost if ours in record]
    hint = (f" (a field the mapping renames is not read under its own name: drop {', '.join(map(repr, own))} from "
            f"the mapping, or fix the column's name)" if own else "")
    raise _MappingError(f"{where}: `columns` (data.columns in a run config) maps {maps}, which the record lacks; "
                        f"its keys are {sorted(record)}{hint}")


def check(source: Source, columns: Mapping[str, str] | None = None, *, on_bad_record: str = "error") -> int:
    """Reads every record of ``source`` once (in one pass per file) and checks that it parses and has a valid format,
    so a bad record stops a run before it starts rather than when the stream reaches it. Returns the number of bad
    records (``on_bad_record="skip"``); with ``"error"`` the first one raises, naming its file and line or row.

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "d.jsonl")
        >>> with open(path, "w") as f:
        ...     _ = f.write('{"prompt": "a", "completion": "b"}\\n{"prompt": "a"}\\n')
        >>> check(open_source(path), on_bad_record="skip")
        1
    """
    bad = 0
    for where, raw in source.scan():
        try:
            validate_record(parse(raw, where, columns), where)
        except ValueError as e:
            if on_bad_record == "error":
                raise bad_record(e, where) from None
            bad += 1
    return bad


def read(path: str | os.PathLike | Sequence[str | os.PathLike], *, columns: Mapping[str, str] | None = None,
         limit: int | None = None, on_bad_record: str = "error") -> list[tuple[str, dict]]:
    """``(where, record)`` for the records of data files (any format; the first ``limit``), each validated
    (``on_bad_record="skip"``: malformed ones left out)."""
    return read_source(open_records(path, columns), columns=columns, limit=limit, on_bad_record=on_bad_record)


def open_records(path: str | os.PathLike | Sequence[str | os.PathLike] | Source,
                 columns: Mapping[str, str] | None = None) -> Source:
    """:func:`jlora.data.open_source` reading only the columns the record formats need (``columns`` maps their
    names), with the schema checked (:func:`check_schema`), so a missing column fails before any record is read.
    A :class:`Source` already open is checked and returned as it is."""
    source = path if isinstance(path, Source) else open_source(path, columns=needed_columns(columns))
    check_schema(source, columns)
    return source


def read_source(source: Source, *, columns: Mapping[str, str] | None = None, limit: int | None = None,
                on_bad_record: str = "error") -> list[tuple[str, dict]]:
    """``(where, record)`` for the records of an opened source (the first ``limit``), each validated; with
    ``on_bad_record="skip"`` a bad record is left out instead of raising."""
    out, skipped = [], []
    for i in range(len(source) if limit is None else min(limit, len(source))):
        where, raw = source[i]
        try:
            record = parse(raw, where, columns)
            validate_record(record, where)
        except ValueError as e:
            if on_bad_record == "error":
                raise bad_record(e, where) from None
            skipped.append(str(e))
            continue
        out.append((where, record))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(skipped) + len(out)} malformed records (on_bad_record='skip'); "
                      f"first: {skipped[0]}", stacklevel=2)
    return out


def read_jsonl(path: str | os.PathLike, *, limit: int | None = None) -> list[dict]:
    """The records of a data file (JSONL, or any format :func:`jlora.data.open_source` reads), each validated
    (`validate_record`); blank lines are skipped.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: ``file:line`` of a malformed line or a record of neither format; an empty file.
    """
    return [r for _, r in read(path, limit=limit)]


def bad_record(e: Exception, where: str) -> DataError:
    """The error a bad record raises under ``on_bad_record='error'``: ``e`` with where the record is (once) and how
    to skip such records instead."""
    message = str(e) if where in str(e) else f"{where}: {e}"
    if isinstance(e, _MappingError):   # the mapping, not the record, is what to fix
        return DataError(message)
    return DataError(f"{message} (on_bad_record='skip' skips and counts bad records)")


def validate_record(record: Any, where: str = "record") -> str:
    """Returns the record's format, ``"chat"`` or ``"pair"``; raises a ValueError naming what is wrong."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, {_FORMATS}; got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(msgs):
            calls = isinstance(m, Mapping) and _tool_calls(m, f"{where}: messages[{i}]")
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not (
                    isinstance(m.get("content"), str) or calls and m.get("content") is None):
                raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and 'content' (a "
                                 f"turn with 'tool_calls' may have no content); got {m!r}")
            _check_role(m["role"], f"{where}: messages[{i}]")
            _check_text(m.get("content") or "", f"{where}: messages[{i}]['content']")
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message is the training target and must have role 'assistant'; "
                             f"got role {msgs[-1]['role']!r}")
        if not msgs[-1].get("content") and not _tool_calls(msgs[-1], where):
            raise ValueError(f"{where}: the last message, the training target, is empty, so there is nothing to "
                             f"train on but the end of the turn")
        chat_tools(record, where)
        return "chat"
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; expected {_FORMATS}; got keys {sorted(record)}")
    for k in ("prompt", "completion"):
        if not isinstance(record[k], str):
            raise ValueError(f"{where}: {k!r} must be a string; got {type(record[k]).__name__}")
        _check_text(record[k], f"{where}: {k!r}")
    if not record["completion"]:
        raise ValueError(f"{where}: 'completion' is empty, so there is nothing to train on but the end of the text")
    return "pair"


def chat_messages(record: Mapping[str, Any], where: str = "record") -> list[Mapping[str, Any]]:
    """A chat record's messages for its template: ``tool_calls`` given as JSON text decoded, as ``tools``.

    Examples:
        >>> chat_messages({"messages": [{"role": "assistant", "content": None, "tool_calls": '[{"name": "f"}]'}]})
        [{'role': 'assistant', 'content': None, 'tool_calls': [{'name': 'f'}]}]
    """
    return [{**m, "tool_calls": _tool_calls(m, where)} if isinstance(m.get("tool_calls"), str) else m
            for m in record["messages"]]


def _tool_calls(message: Mapping[str, Any], where: str) -> list | None:
    """A message's ``tool_calls`` (a list of objects, or its JSON text); None when it has none."""
    return _json_list(message.get("tool_calls"), f"{where}: 'tool_calls' must be a list of tool call objects")


def _json_list(value: Any, error: str) -> list | None:
    """``value`` as a list of objects (given as such or as its JSON text); None for none (null, "", []); else a
    ValueError ``error`` showing the value."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError:
            raise ValueError(f"{error} or its JSON text; got {value!r:.200}") from None
    if value is None or isinstance(value, list) and all(isinstance(t, Mapping) for t in value):
        return value or None
    raise ValueError(f"{error} or its JSON text; got {value!r:.200}")


def chat_tools(record: Mapping[str, Any], where: str = "record") -> list | None:
    """A chat record's ``tools`` for its template: a list of objects (JSON schemas), given as such or as its JSON
    text (as data sets on the Hub often store it); None when the record has none.

    Examples:
        >>> chat_tools({"tools": '[{"name": "get_time", "parameters": {}}]'})
        [{'name': 'get_time', 'parameters': {}}]
        >>> chat_tools({"tools": "get_time"}, "f.jsonl:3")
        Traceback (most recent call last):
        ...
        ValueError: f.jsonl:3: 'tools' must be a list of tool objects (JSON schemas) or its JSON text; got 'get_time'
    """
    return _json_list(record.get("tools"), f"{where}: 'tools' must be a list of tool objects (JSON schemas)")


def _check_text(text: str, where: str) -> None:
    r"""Refuses a string that is no text: JSON admits a lone UTF-16 surrogate (``"\ud800"``), a tokenizer does not.

    Examples:
        >>> _check_text("a\ud800b", "f.jsonl:3: 'prompt'")
        Traceback (most recent call last):
        ...
        ValueError: f.jsonl:3: 'prompt' holds '\ud800' at character 1, a lone UTF-16 surrogate (a broken '\ud800'-style escape): no character; fix or remove the record
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} holds {text[e.start:e.start + 1]!r} at character {e.start}, a lone UTF-16 "
                         f"surrogate (a broken '\\ud800'-style escape): no character; fix or remove the record"
                         ) from None


def _check_role(role: str, where: str) -> None:
    """Refuses a chat role that looks like a typo of a :data:`CHAT_ROLES` one ("usr", "User", "asistant").

    Examples:
        >>> _check_role("ipython", "x"), _check_role("narrator", "x")   # other roles go to the chat template
        (None, None)
        >>> _check_role("usr", "f.jsonl:3: messages[0]")
        Traceback (most recent call last):
        ...
        ValueError: f.jsonl:3: messages[0]: role 'usr' is not a chat role; did you mean 'user'? (the common roles: system, developer, user, assistant, tool, function, ipython)
    """
    if role in CHAT_ROLES:
        return
    close = [r for r in CHAT_ROLES if r == role.strip().lower()] or difflib.get_close_matches(
        role.strip().lower(), CHAT_ROLES, n=1, cutoff=0.6)
    if close:
        raise ValueError(f"{where}: role {role!r} is not a chat role; did you mean {close[0]!r}? (the common "
                         f"roles: {', '.join(CHAT_ROLES)})")


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
    held = held_out_mask(n, k, seed)
    return [x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h]



# ---------------------------------------------------------------------------------------------------- tokenizing


@dataclasses.dataclass(frozen=True)
class Example:
    """A tokenized example: ``prompt_ids`` (context) then ``completion_ids`` (targets). ``prompt_mask``, one 0 or 1
    per prompt id, marks targets inside the prompt (a chat's earlier assistant turns); empty when there are none."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    source: str = ""
    prompt_mask: tuple[int, ...] = ()

    def __post_init__(self):
        if self.prompt_mask and len(self.prompt_mask) != len(self.prompt_ids):
            raise ValueError(f"prompt_mask has {len(self.prompt_mask)} entries for {len(self.prompt_ids)} prompt ids")

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.completion_ids

    @property
    def loss_mask(self) -> tuple[int, ...]:
        return (self.prompt_mask or (0,) * len(self.prompt_ids)) + (1,) * len(self.completion_ids)


class Tokenized(NamedTuple):
    """:func:`tokenize_checked`'s result: the example, whether its pieces tokenized apart give the joined text's ids,
    and how many earlier assistant turns stayed context (see :func:`split_chat`)."""

    example: Example
    matches: bool
    context_turns: int = 0


def format_chat(messages: Sequence[Mapping[str, Any]], tokenizer, *, tools: list | None = None) -> tuple[str, str]:
    """(prompt_text, completion_text) of a chat whose last turn is the assistant's (see the module docstring).

    Raises:
        ValueError: the chat template refuses the conversation (its ``raise_exception``, or an error rendering
            it), or renders it in a way that cannot be split at the last turn.
    """
    prompt = _render(tokenizer, messages[:-1], add_generation_prompt=True, tools=tools)
    full = _render(tokenizer, messages, add_generation_prompt=False, tools=tools)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation without its last turn (plus the generation "
                         "prompt) differently from the start of the whole conversation, so the assistant turn "
                         f"cannot be split off;\n prompt: {prompt!r}\n full:   {full!r}\nuse prompt/completion "
                         "records instead")
    return prompt, full[len(prompt):]


class ChatSplit(NamedTuple):
    """A rendered chat split for training (:func:`split_chat`)."""

    prompt: str                            # all turns but the last, plus the generation prompt: what generation sees
    completion: str                        # the last assistant turn: the rest of the rendered chat
    targets: tuple[tuple[int, int], ...]   # character spans of `prompt` that are earlier assistant turns (targets)
    context_turns: int                     # earlier assistant turns left as context


def split_chat(messages: Sequence[Mapping[str, Any]], tokenizer, *, chat_turns: str = "all",
               tools: list | None = None) -> ChatSplit:
    """The rendered chat as :func:`format_chat`'s prompt and completion, and the earlier assistant turns' spans.

    With ``chat_turns="all"`` the earlier assistant turns are target spans too. A template that marks them with
    ``{% generation %}`` (as transformers' ``return_assistant_tokens_mask`` reads it) gives them in one rendering.
    Otherwise a turn's span is the text between the chat up to it rendered with the generation prompt and the chat
    up to its end, where both renderings start the whole one; a template that renders the chat up to a turn
    otherwise (it moves the system prompt into the last user turn, adds or strips reasoning by a turn's place, or
    refuses a partial chat) leaves that turn as context, counted. That is two renderings per earlier assistant
    turn: the work grows with turns x length (a 50-turn chat: a few tenths of a second; the Loader's workers
    spread it).

    Examples:
        >>> class Chat:  # a stand-in with a ChatML-like template
        ...     def apply_chat_template(self, messages, add_generation_prompt, tools=None):
        ...         text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        ...         return text + ("<assistant>" if add_generation_prompt else "")
        >>> msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        ...         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
        >>> split = split_chat(msgs, Chat())
        >>> split.prompt, split.completion, [split.prompt[i:j] for i, j in split.targets], split.context_turns
        ('<user>a</><assistant>b</><user>c</><assistant>', 'd</>', ['b</>'], 0)
        >>> split_chat(msgs, Chat(), chat_turns="last").targets
        ()
    """
    if chat_turns not in CHAT_TURNS:
        raise ValueError(f"`chat_turns` must be one of {CHAT_TURNS}; got {chat_turns!r}")
    prompt, completion = format_chat(messages, tokenizer, tools=tools)
    marked = getattr(tokenizer, "generation_spans", None) if chat_turns == "all" else None
    try:
        marked = marked and marked(messages, **({"tools": tools} if tools is not None else {}))
    except Exception:  # noqa: BLE001 (the marks only save renderings; format_chat rendered this chat already)
        marked = None
    if marked and marked[0] == prompt + completion:
        return ChatSplit(prompt, completion, tuple((i, j) for i, j in marked[1] if j <= len(prompt)), 0)
    targets, at, context = [], 0, 0
    for i, m in enumerate(messages[:-1] if chat_turns == "all" else ()):
        if m["role"] != "assistant":
            continue
        try:
            head = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
            upto = prompt.startswith(head) and _render(tokenizer, messages[:i + 1], add_generation_prompt=False,
                                                       tools=tools)
        except ValueError:
            head = upto = ""
        if not (upto and at <= len(head) < len(upto) and prompt.startswith(upto)):
            context += 1
            continue
        targets.append((len(head), len(upto)))
        at = len(upto)
    return ChatSplit(prompt, completion, tuple(targets), context)


def _target_mask(tokenizer, text: str, spans: Sequence[tuple[int, int]], end: Sequence[int]
                 ) -> tuple[list[int], list[int]]:
    """``text``'s ids (one encode, as generation sees it) and a 0/1 per id: 1 on the tokens that overlap a span,
    through the last end-of-turn id among them (the rest, e.g. ChatML's newline after ``<|im_end|>``, is
    context), or, with none among them, through the end-of-turn id that follows them after whitespace at most (a
    template that closes a turn only before the next, or whose ``{% generation %}`` mark stops before the end)."""
    if hasattr(tokenizer, "encode_offsets"):
        ids, offsets = tokenizer.encode_offsets(text)
    else:   # a transformers fast tokenizer
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    mask = [0] * len(ids)
    starts, stops = [a for a, _ in offsets], [b for _, b in offsets]
    for (s, e), after in zip(spans, [*(s for s, _ in spans[1:]), len(text)]):
        first, last = bisect.bisect_right(stops, s), bisect.bisect_left(starts, e)   # ids [first, last) overlap it
        through = _through_last_end(ids[first:last], end)
        k = last
        while not through and k < len(ids) and starts[k] < after:
            if ids[k] in end:
                through = k + 1 - first
            elif text[starts[k]:stops[k]].strip():
                break
            k += 1
        mask[first:first + (through or last - first)] = [1] * (through or last - first)
    return ids, mask


def _render(tokenizer, messages, *, add_generation_prompt: bool, tools: list | None = None) -> str:
    """The chat template's text; a template that refuses the conversation is a ValueError (a bad record)."""
    import jinja2

    try:
        kwargs = {"tools": tools} if tools is not None else {}
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except (jinja2.TemplateError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"the chat template cannot render this conversation ({type(e).__name__}: {e})") from None


def _end_ids(tokenizer) -> tuple[int, ...]:
    ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or ())
    eos = tokenizer.eos_token_id
    return ids or (() if eos is None else (eos,))


def _through_last_end(ids: Sequence[int], end: Sequence[int]) -> int:
    """How many of ``ids`` run through the last end-of-turn id among them (0: none)."""
    return max((i + 1 for i, t in enumerate(ids) if t in end), default=0)


def _pair_prompt_ids(prompt: str, tokenizer) -> list[int]:
    """A raw prompt's ids: BOS when the tokenizer adds one, then the text (never an EOS)."""
    return _bos(tokenizer) + tokenizer.encode(prompt, add_special_tokens=False)


def _bos(tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] if bool(getattr(tokenizer, "add_bos_token", False)) and bos is not None else []


def tokenize(record: Mapping[str, Any], tokenizer, *, source: str = "", chat_turns: str = "all") -> Example:
    """One record (either format) as an `Example`; see the module docstring for the formatting rules."""
    return tokenize_checked(record, tokenizer, source=source, check_boundary=False, chat_turns=chat_turns).example


def tokenize_checked(record: Mapping[str, Any], tokenizer, *, source: str = "", check_boundary: bool = True,
                     chat_turns: str = "all") -> Tokenized:
    """`tokenize`, whether prompt and completion tokenized apart give the joined text's ids (a token merging across
    the boundary makes them differ; True when not ``check_boundary``), and how many of a chat's earlier assistant
    turns stayed context (:func:`split_chat`). The prompt, earlier turns included, is encoded once, as generation
    sees it; one extra encode of the joined text."""
    fmt = validate_record(record, source or "record")
    if chat_turns not in CHAT_TURNS:
        raise ValueError(f"`chat_turns` must be one of {CHAT_TURNS}; got {chat_turns!r}")
    end = _end_ids(tokenizer)
    context, prompt_mask = 0, ()
    if fmt == "chat":
        split = split_chat(chat_messages(record, source or "record"), tokenizer, chat_turns=chat_turns,
                           tools=chat_tools(record, source or "record"))
        texts, context = [split.prompt, split.completion], split.context_turns
        if split.targets:
            raw_prompt, mask = _target_mask(tokenizer, split.prompt, split.targets, end)
            prompt_mask = tuple(mask) if any(mask) else ()
        else:
            raw_prompt = tokenizer.encode(split.prompt, add_special_tokens=False)
        raw = [raw_prompt, tokenizer.encode(split.completion, add_special_tokens=False)]
        cut = _through_last_end(raw[1], end)
        prompt, completion = raw_prompt, raw[1][:cut] if cut else raw[1] + list(end[:1])
    else:
        texts = [record["prompt"], record["completion"]]
        raw = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        prompt, completion = _bos(tokenizer) + raw[0], raw[1] + list(end[:1])
    if not completion:
        raise ValueError(f"{source or 'record'}: the completion is empty, so there is nothing to train on")
    matches = not check_boundary or raw[0] + raw[1] == tokenizer.encode("".join(texts), add_special_tokens=False)
    return Tokenized(Example(tuple(prompt), tuple(completion), source, prompt_mask), matches, context)


def overflow_message(ex: Example, max_length: int, where: str) -> str:
    return (f"{where}: example has {len(ex)} tokens (prompt {len(ex.prompt_ids)} + completion "
            f"{len(ex.completion_ids)}) but max_length is {max_length}; raise `max_length`, shorten the example, or "
            f"choose overflow='truncate' or 'drop'")


def fit(ex: Example, max_length: int, overflow: str, where: str = "") -> Example | None:
    """The ``overflow`` policy for one example: itself when it fits; else an error (``"error"``), None
    (``"drop"``, or ``"truncate"`` when the first ``max_length`` tokens hold no target) or its first ``max_length``
    tokens (``"truncate"``).

    Examples:
        >>> fit(Example((1, 2), (3, 4, 5)), 4, "truncate")
        Example(prompt_ids=(1, 2), completion_ids=(3, 4), source='', prompt_mask=())
        >>> fit(Example((1, 2, 3), (4,), prompt_mask=(0, 1, 0)), 2, "truncate")   # an earlier turn's target kept
        Example(prompt_ids=(1, 2), completion_ids=(), source='', prompt_mask=(0, 1))
    """
    if len(ex) <= max_length:
        return ex
    if overflow == "error":
        raise DataError(overflow_message(ex, max_length, where or ex.source or "record"))
    if overflow == "drop" or not any(ex.loss_mask[:max_length]):
        return None
    n = min(len(ex.prompt_ids), max_length)
    return Example(ex.prompt_ids[:n], ex.completion_ids[:max_length - n], ex.source, ex.prompt_mask[:n])


def check_policies(*, max_length: int, overflow: str, on_bad_record: str = "error", chat_turns: str = "all") -> None:
    if chat_turns not in CHAT_TURNS:
        raise ValueError(f"`chat_turns` must be one of {CHAT_TURNS}; got {chat_turns!r}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"`overflow` must be one of {OVERFLOW_POLICIES}; got {overflow!r}")
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"`on_bad_record` must be one of {BAD_RECORD_POLICIES}; got {on_bad_record!r}")
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2; got {max_length}")


def overflow_warning(changed: int, total: int, max_length: int, overflow: str, first: str) -> str:
    what = "dropped" if overflow == "drop" else "truncated (or dropped where no target is left in them)"
    return f"{changed} of {total} examples exceed max_length={max_length} and were {what}; first: {first}"


def boundary_warning(mismatched: int, total: int, first: str) -> str:
    return (f"{mismatched} of {total} examples tokenize differently when prompt and completion are joined (a token "
            f"merges across the boundary); training uses the separate tokenizations, as generation sees them; "
            f"first: {first}")


def context_turns_warning(where: str, count: str = "") -> str:
    """The warning for chats whose earlier assistant turns stay context (:func:`split_chat`); ``count``: "n of m"."""
    return (f"{count + ' chats, first ' if count else ''}{where}: the chat template renders earlier assistant turns "
            f"differently inside the whole chat than as its end (it moves the system prompt, adds or strips reasoning "
            f"by a turn's place, or refuses a partial chat), so they are context, not targets (the last turn is "
            f"trained); chat_turns='last' trains the last turn only, without this warning")


def tokenize_all(records: Sequence[Mapping[str, Any]], tokenizer, *, max_length: int, overflow: str = "error",
                 sources: Sequence[str] | None = None, check_boundaries: bool = True,
                 on_bad_record: str = "error", chat_turns: str = "all") -> list[Example]:
    """Tokenizes records and applies the ``overflow`` policy (:func:`fit`) to examples longer than ``max_length``.

    Args:
        records: validated records (either format).
        tokenizer: a `jlora.hf.tokenizer.Tokenizer` (or anything with its ``encode``/``apply_chat_template``/
            ``bos_token_id``/``eos_token_id``/``eos_token_ids``).
        max_length: the longest example, in tokens.
        overflow: "error" (default), "truncate" (keep the first ``max_length`` tokens; an example with no target
            among them is dropped) or "drop".
        sources: a "file:line" per record, for messages.
        check_boundaries: warn when prompt and completion tokenized apart differ from the joined text's ids.
        on_bad_record: "skip" leaves out (and counts, in a warning) a record the tokenizer refuses (a chat its
            template cannot render or split), as the streaming :class:`jlora.data.Loader` does; "error" raises.
        chat_turns: "all" (default) trains every assistant turn of a chat, "last" only the last one.
    """
    check_policies(max_length=max_length, overflow=overflow, on_bad_record=on_bad_record, chat_turns=chat_turns)
    if not records:
        raise ValueError(f"no records to tokenize; expected at least one, {_FORMATS}")
    sources = sources or [f"record {i}" for i in range(len(records))]
    out, changed, mismatched, skipped, context = [], [], [], [], []
    for record, where in zip(records, sources):
        try:
            ex, matches, turns = tokenize_checked(record, tokenizer, source=where, check_boundary=check_boundaries,
                                                  chat_turns=chat_turns)
        except ValueError as e:
            if on_bad_record != "skip":
                raise bad_record(e, where) from None
            skipped.append(where)
            continue
        kept = fit(ex, max_length, overflow, where)
        if kept is not ex:
            changed.append(where)
        if kept is not None:
            out.append(kept)
            mismatched += [where] * (not matches)
            context += [where] * bool(turns)
    if changed:
        warnings.warn(overflow_warning(len(changed), len(records), max_length, overflow, changed[0]), stacklevel=2)
    if mismatched:
        warnings.warn(boundary_warning(len(mismatched), len(records), mismatched[0]), stacklevel=2)
    if context:
        warnings.warn(context_turns_warning(context[0], f"{len(context)} of {len(records)}"), stacklevel=2)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {len(records)} records the tokenizer refuses "
                      f"(on_bad_record='skip'); first: {skipped[0]}", stacklevel=2)
    if not out:
        why = f"for exceeding max_length={max_length}"
        raise ValueError(f"all {len(records)} examples were dropped " + (
            f"({len(skipped)} refused by the tokenizer, the rest {why})" if skipped else why))
    return out


def load(path: str | os.PathLike, tokenizer, *, max_length: int, overflow: str = "error",
         columns: Mapping[str, str] | None = None, on_bad_record: str = "error",
         chat_turns: str = "all") -> list[Example]:
    """:func:`read` + `tokenize_all` into memory (for small data; :class:`jlora.data.Loader` streams files), with
    ``file:line`` sources in every message; ``on_bad_record="skip"`` leaves malformed records out."""
    return tokenize_source(open_records(path, columns), tokenizer, max_length=max_length, overflow=overflow,
                           columns=columns, on_bad_record=on_bad_record, chat_turns=chat_turns)


def tokenize_source(source: Source, tokenizer, *, max_length: int, overflow: str = "error",
                    columns: Mapping[str, str] | None = None, on_bad_record: str = "error",
                    chat_turns: str = "all") -> list[Example]:
    """Every record of an opened source (a :class:`jlora.data.sources.Subset` too), parsed, validated and
    tokenized into memory by :func:`tokenize_all`, with ``file:line`` sources in every message."""
    pairs = read_source(source, columns=columns, on_bad_record=on_bad_record)
    return tokenize_all([r for _, r in pairs], tokenizer, max_length=max_length, overflow=overflow,
                        sources=[w for w, _ in pairs], on_bad_record=on_bad_record, chat_turns=chat_turns)


def load_splits(train: str | os.PathLike, tokenizer, *, valid: str | os.PathLike | None = None,
                valid_fraction: float = 0.0, max_length: int, overflow: str = "error",
                seed: int = 0, chat_turns: str = "all") -> tuple[list[Example], list[Example]]:
    """Train and validation examples in memory: from ``valid`` when given, else a seeded ``valid_fraction`` of
    ``train`` (an empty list when neither)."""
    pairs = read(train)
    if valid:
        vpairs = read(valid)
    elif valid_fraction > 0:
        pairs, vpairs = split(pairs, valid_fraction=valid_fraction, seed=seed)
    else:
        vpairs = []

    def tok(ps):
        return tokenize_all([r for _, r in ps], tokenizer, max_length=max_length, overflow=overflow,
                            sources=[w for w, _ in ps], chat_turns=chat_turns) if ps else []

    return tok(pairs), tok(vpairs)


def length_stats(examples: Sequence[Example]) -> dict[str, float]:
    """Token-length distribution: min, mean, p50, p90, max, and the mean completion length."""
    lengths = np.array([len(e) for e in examples])
    return {"n": len(examples), "min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
            "p50": int(np.percentile(lengths, 50)), "p90": int(np.percentile(lengths, 90)),
            "max": int(lengths.max()),
            "completion_mean": round(float(np.mean([len(e.completion_ids) for e in examples])), 1)}


# ---------------------------------------------------------------------------------------------------- evaluation


class EvalPrompt(NamedTuple):
    """A generation-based eval item: the prompt (text and ids) and the reference answer."""

    prompt_text: str
    prompt_ids: list[int]
    target: str                  # the reference completion text (the last assistant turn, or `completion`)
    source: str


def eval_prompts(data: str | os.PathLike | Source | Sequence[Mapping[str, Any]], tokenizer, *,
                 limit: int | None = None, columns: Mapping[str, str] | None = None,
                 on_bad_record: str = "error") -> list[EvalPrompt]:
    """Prompts to decode from and their references, from data files, an opened source (a validation split) or a
    list of records (the first ``limit``; ``on_bad_record="skip"`` leaves malformed records of files out)."""
    if isinstance(data, (str, os.PathLike, Source)):
        pairs = read_source(open_records(data, columns), columns=columns, limit=limit, on_bad_record=on_bad_record)
    else:
        pairs = [(f"record {i}", r) for i, r in enumerate(data)]
    out = []
    for where, record in pairs[:limit]:
        if validate_record(record, where) == "chat":
            try:
                messages = chat_messages(record, where)
                text, completion = format_chat(messages, tokenizer, tools=chat_tools(record, where))
            except ValueError as e:
                if on_bad_record == "skip":
                    continue
                raise bad_record(e, where) from None
            target = messages[-1].get("content")
            if not target and messages[-1].get("tool_calls"):   # the reference: the template's rendering, to its end
                done = tokenizer.encode(completion, add_special_tokens=False)
                end = _end_ids(tokenizer)
                target = tokenizer.decode(done[:next((i for i, t in enumerate(done) if t in end), len(done))])
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            text, target = record["prompt"], record["completion"]
            ids = _pair_prompt_ids(text, tokenizer)
        out.append(EvalPrompt(text, ids, target, where))
    return out

