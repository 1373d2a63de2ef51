"""The demo's task, strict-JSON extraction: its generation-eval scorer, outside the library.

``configs/default.yaml`` points the run's generation eval at it with ``eval.scorer: examples/json_task.py:score``
(any ``path/to/file.py:function`` or ``package.module:function`` of the same shape works; see
:mod:`jlora.cli.scoring`). The data are ``examples/data/*.jsonl``, written by ``examples/data/make_data.py``: chats
whose answer is one compact JSON object (name, date, amount, city).

Examples:
    >>> score('{"city": "Oslo", "amount": 12.5}', '{"amount": 12.50, "city": "Oslo"}')
    True
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("repeated key")
    return dict(pairs)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=0.0, abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def score(output: str, target: str | Mapping[str, Any]) -> bool:
    """Whether ``output`` is exactly one JSON object with exactly ``target``'s keys and values.

    Surrounding whitespace is allowed; any other text (prose, code fences, a second object) fails, and so does a
    repeated key. Numbers compare by value (``12.5 == 12.50``, ``3 == 3.0``), booleans only with booleans, strings
    exactly. ``target`` is the reference answer: its JSON text (as the run passes it) or the parsed dict. A target
    that is not a JSON object matches nothing.

    Examples:
        >>> score(' {"a": 1, "b": "x"}\\n', {"b": "x", "a": 1.0})
        True
        >>> score('Sure! {"a": 1, "b": "x"}', '{"a": 1, "b": "x"}')
        False
        >>> score('{"a": 1}', '{"a": 1, "b": "x"}')
        False
    """
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except json.JSONDecodeError:
            return False
    if not isinstance(target, Mapping):
        return False
    try:
        got = json.loads(output, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, TypeError, ValueError):
        return False
    return isinstance(got, dict) and _same(got, dict(target))


score.label = "exact JSON"   # how run reports name this metric
