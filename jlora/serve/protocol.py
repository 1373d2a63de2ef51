"""OpenAI's completion and chat-completion requests, checked field by field, and their responses and stream chunks.

Pure functions, no HTTP: :func:`completion_request` and :func:`chat_request` turn a decoded JSON body into a
:class:`Request` (token ids per prompt, settings) or raise :class:`ApiError` naming the field; :class:`TextStream`
turns a row's tokens into text deltas, holding back what could still become a stop string or an unfinished UTF-8
character; the ``*_response`` / ``*_chunk`` functions build OpenAI's JSON objects.

Supported fields: ``model``, ``prompt`` (a string, a list of strings, a list of token ids or a list of such lists;
completions) or ``messages`` (chat; ``content`` a string or a list of text parts), ``max_tokens`` (chat:
``max_completion_tokens`` too; default 16 for completions as in OpenAI's API, the context left but at most 1024 for
chat), ``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``, ``stream_options``
(``include_usage``), ``n`` (1), and the extensions ``top_k`` (0 or -1: off), ``ignore_eos`` and ``return_token_ids``
(each choice gets ``token_ids``, the generated ids). Penalties, ``logprobs``, ``logit_bias``, tools and other
fields the server cannot honour are refused by name rather than ignored.

Examples:
    >>> req = completion_request({"model": "m", "prompt": [[1, 2, 3]], "max_tokens": 4, "stop": "x"}, None)
    >>> req.prompts, req.max_tokens, req.stop
    ([[1, 2, 3]], [4], ('x',))
    >>> completion_request({"model": "m", "prompt": "hi", "temperature": "hot"}, None)
    Traceback (most recent call last):
    ...
    jlora.serve.protocol.ApiError: temperature: must be a finite number; got 'hot'
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

MAX_STOPS = 4
COMPLETION_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 1024          # chat: the context left, at most this (the KV cache is sized by it)
IGNORED = frozenset({"user", "metadata", "store"})
COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "stream",
                    "stream_options", "n", "ignore_eos", "return_token_ids", "presence_penalty", "frequency_penalty",
                    "logprobs", "logit_bias"}) | IGNORED
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error response: HTTP ``status``, a message naming the problem, the offending field (``param``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                             409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error",
                             503: "service_unavailable"}.get(status, "invalid_request_error" if status < 500
                                                             else "server_error")

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(field: str, problem: str) -> ApiError:
    return ApiError(400, f"{field}: {problem}", param=field)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw:
        raise ApiError(400, "the request body is empty; send a JSON object (Content-Type: application/json)")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") \
            from None
    except RecursionError:
        raise ApiError(400, "the request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object; got {type(body).__name__}")
    return body


# --- field checks ------------------------------------------------------------------------------------------------

def _number(body, field, default, lo, hi, *, lo_open=False):
    x = body.get(field)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise bad(field, f"must be a finite number; got {x!r}")
    if x < lo or x > hi or (lo_open and x == lo):
        raise bad(field, f"must be in {'(' if lo_open else '['}{lo}, {hi}]; got {x!r}")
    return float(x)


def _int(body, field, default, lo, hi=None):
    x = body.get(field)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, int):
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        else:
            raise bad(field, f"must be an integer; got {x!r}")
    if x < lo or (hi is not None and x > hi):
        raise bad(field, f"must be {'>= ' + str(lo) if hi is None else f'in [{lo}, {hi}]'}; got {x!r}")
    return x


def _bool(body, field, default=False):
    x = body.get(field)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise bad(field, f"must be true or false; got {x!r}")
    return x


def _unsupported(body: Mapping, field: str, *allowed) -> None:
    if field in body and body[field] not in (None, *allowed):
        raise bad(field, f"is not supported by jlora serve (only {', '.join(map(repr, allowed)) or 'null'}); "
                         f"got {body[field]!r}")


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request: ``prompts`` as token ids (one row each) and its settings; ``max_tokens`` per prompt."""

    model: str
    prompts: list
    max_tokens: list
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    return_token_ids: bool
    chat: bool


def _common(body: Mapping, fields: frozenset) -> dict:
    unknown = sorted(set(body) - fields)
    if unknown:
        raise bad(unknown[0], f"unknown field (jlora serve accepts {', '.join(sorted(fields - IGNORED))})")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", f"is required: the base model's name or an adapter's (GET /v1/models lists them); got "
                           f"{model!r}")
    for f in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, f, 0, 0.0)
    _unsupported(body, "logprobs", False, 0)
    _unsupported(body, "logit_bias", {})
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise bad("n", f"only n=1 is supported; send {n} requests instead (they are batched together)")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad("stop", f"must be a string or a list of strings; got {stop!r}")
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise bad("stop", f"at most {MAX_STOPS} non-empty strings; got {list(stops)}")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad("stream_options", f"must be an object with only include_usage; got {options!r}")
    stream = _bool(body, "stream")
    if options and not stream:
        raise bad("stream_options", "is only allowed with stream: true")
    seed = _int(body, "seed", None, -(2**63), 2**64 - 1)
    top_k = _int(body, "top_k", 0, -1, 2**31 - 1)
    return dict(model=model, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=max(top_k, 0), seed=seed,
                stop=stops, stream=stream, include_usage=_bool(options or {}, "include_usage"),
                ignore_eos=_bool(body, "ignore_eos"), return_token_ids=_bool(body, "return_token_ids"))


def _max_tokens(body, field, prompts, context, default):
    asked = _int(body, field, None, 1)
    out = []
    for p in prompts:
        if len(p) >= context:
            raise bad("messages" if field == "max_completion_tokens" or "messages" in body else "prompt",
                      f"the prompt has {len(p)} tokens; the model's context is {context} tokens, leaving no room "
                      f"for a completion: shorten it")
        room = context - len(p)
        if asked is None:
            out.append(min(default, room))
        elif asked > room:
            raise bad(field, f"the prompt ({len(p)} tokens) plus {field} ({asked}) exceeds the model's context of "
                             f"{context} tokens: ask for at most {room}")
        else:
            out.append(asked)
    return out


def _tokens(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def completion_request(body: Mapping, tokenizer, *, context: int = 2**31, vocab_size: int | None = None) -> Request:
    """A checked ``/v1/completions`` request; prompts are encoded as ``jlora generate`` does (special tokens
    added per the tokenizer)."""
    common = _common(body, COMPLETION_FIELDS)
    _unsupported(body, "echo", False)
    _unsupported(body, "best_of", 1)
    _unsupported(body, "suffix", "")
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    elif _tokens(prompt):
        texts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(_tokens(p) for p in prompt):
        texts = [list(p) for p in prompt]
    else:
        raise bad("prompt", f"must be a string, a list of strings, a list of token ids or a list of token-id lists; "
                            f"got {_short(prompt)}")
    prompts = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            if tokenizer is None:
                raise bad("prompt", "this model has no tokenizer: send token ids")
            ids = tokenizer.encode(t)
        else:
            ids = t
        if not ids:
            raise bad("prompt", f"prompt {i} is empty (no tokens)")
        if vocab_size and any(not 0 <= x < vocab_size for x in ids):
            raise bad("prompt", f"prompt {i} holds token ids outside the vocabulary [0, {vocab_size})")
        prompts.append(ids)
    return Request(prompts=prompts, max_tokens=_max_tokens(body, "max_tokens", prompts, context,
                                                           COMPLETION_DEFAULT_MAX_TOKENS), chat=False, **common)


def chat_prompt(messages, tokenizer) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template (as ``jlora generate --chat`` does)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", f"must be a non-empty list of {{role, content}} objects; got {_short(messages)}")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"must be an object with role and content; got {_short(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {list(ROLES)}; got {role!r}")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]", f"only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                                            f"are supported; got {_short(part)}")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise bad(f"messages[{i}].content", f"must be a string or a list of text parts; got {_short(content)}")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise bad(f"messages[{i}].{extra[0]}", "is not supported by jlora serve")
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise bad(f"messages[{i}].name", f"must be a string; got {_short(name)}")
        plain.append({"role": role, "content": content, **({"name": name} if name is not None else {})})
    if tokenizer is None:
        raise bad("messages", "this model has no tokenizer, so no chat template: use /v1/completions with token ids")
    try:
        text = tokenizer.apply_chat_template(plain, add_generation_prompt=True)
    except ValueError as e:
        raise bad("messages", str(e)) from None
    except Exception as e:  # noqa: BLE001 - the template's own raise_exception() or a Jinja error
        raise bad("messages", f"the model's chat template refused them: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def chat_request(body: Mapping, tokenizer, *, context: int = 2**31, vocab_size: int | None = None) -> Request:
    """A checked ``/v1/chat/completions`` request (one prompt: the rendered conversation)."""
    common = _common(body, CHAT_FIELDS)
    _unsupported(body, "top_logprobs", 0)
    if "messages" not in body:
        raise bad("messages", "is required: a list of {role, content} objects")
    ids = chat_prompt(body["messages"], tokenizer)
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get("max_completion_tokens") is not None and body.get("max_tokens") is not None:
        raise bad("max_tokens", "give max_tokens or max_completion_tokens, not both")
    return Request(prompts=[ids], max_tokens=_max_tokens(body, field, [ids], context, CHAT_DEFAULT_MAX_TOKENS),
                   chat=True, **common)


def _short(x: Any, n: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= n else text[:n] + "..."


# --- text ---------------------------------------------------------------------------------------------------------

class TextStream:
    """One row's text as its tokens arrive: ``push(token)`` returns the new text that is safe to send (nothing that
    could still turn into a stop string, no half of a UTF-8 character); ``stopped`` says a stop string appeared
    (the text is cut before it); ``finish()`` returns what was held back. ``after``: the prompt's ids, so that the
    text is what the row adds to the prompt's, leading space included (see ``jlora.hf.Tokenizer.decode``).

    Examples:
        >>> class Chars:     # a toy tokenizer: token i is chr(i)
        ...     def decode(self, ids, skip_special_tokens=True):
        ...         return "".join(map(chr, ids))
        >>> s = TextStream(Chars(), stop=("END",))
        >>> [s.push(ord(c)) for c in "abEN"], s.push(ord("D")), s.stopped, s.text
        (['a', 'b', '', ''], '', True, 'ab')
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), *, incremental: bool = True, after: Sequence[int] = ()):
        self.tokenizer, self.stop, self.after = tokenizer, tuple(stop), list(after)   # after: the prompt's ids
        self.incremental = incremental or bool(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = ""
        self.stopped = False
        self.unsent_ids: list[int] = []

    def _decode(self) -> str:
        if self.tokenizer is None:
            return ""
        kw = {"after": self.after} if self.after else {}   # the completion's own leading space (Tokenizer.decode)
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, **kw)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self.unsent_ids.append(int(token))
        if not self.incremental:
            return ""
        text = self._decode()
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self._emit(self.text)
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self._emit(text[:safe - hold])

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        delta, self.sent = upto[len(self.sent):], upto
        return delta

    def finish(self) -> str:
        """The rest of the text (the final decode, cut at a stop string)."""
        if not self.stopped:
            text = self._decode()
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            self.stopped = cut >= 0
            self.text = text[:cut] if cut >= 0 else text
        if self.text.startswith(self.sent):
            delta, self.sent = self.text[len(self.sent):], self.text
            return delta
        return ""

    def take_ids(self) -> list[int]:
        ids, self.unsent_ids = self.unsent_ids, []
        return ids


# --- responses ----------------------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: Request, rid: str, created: int, choices: Sequence[dict], prompt_tokens: int,
             completion_tokens: int) -> dict:
    """The non-streaming response; each choice is ``{"text", "finish_reason", "token_ids"}``."""
    out = []
    for i, c in enumerate(choices):
        if req.chat:
            choice = {"index": i, "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                      "finish_reason": c["finish_reason"]}
        else:
            choice = {"index": i, "text": c["text"], "logprobs": None, "finish_reason": c["finish_reason"]}
        if req.return_token_ids:
            choice["token_ids"] = c["token_ids"]
        out.append(choice)
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": out, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(req: Request, rid: str, created: int, index: int, *, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, token_ids: list | None = None) -> dict:
    """One streamed chunk for choice ``index``."""
    if req.chat:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if req.return_token_ids and token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": [choice]}


def usage_chunk(req: Request, rid: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj) -> bytes:
    """A server-sent event carrying ``obj`` as JSON (or the literal ``[DONE]``)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def now() -> int:
    return int(time.time())


__all__ = ["ApiError", "Request", "TextStream", "parse_json", "completion_request", "chat_request", "chat_prompt",
           "response", "chunk", "usage_chunk", "sse", "new_id", "usage"]
